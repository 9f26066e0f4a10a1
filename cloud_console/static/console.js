// Shared helpers of the console pages: JSON API calls with the CSRF token, formatting, live events.
"use strict";

const EC = (() => {
  const meta = (name) => {
    const el = document.querySelector(`meta[name="${name}"]`);
    return el ? el.content : "";
  };
  const csrf = meta("csrf-token");
  const role = meta("role");

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (method !== "GET") headers["X-CSRF-Token"] = csrf;
    const res = await fetch(path, {
      method,
      headers,
      credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (res.status === 401) {
      location.href = "/login?next=" + encodeURIComponent(location.pathname);
      throw new Error("log in first");
    }
    const data = await res.json().catch(() => ({}));
    if (!res.ok) {
      let detail = data.detail;
      if (Array.isArray(detail)) detail = detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
      const err = new Error(detail || `HTTP ${res.status}`);
      err.status = res.status;
      throw err;
    }
    return data;
  }

  const esc = (v) =>
    String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

  const num = (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

  function age(ts) {
    if (!ts) return "never";
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return new Date(ts * 1000).toLocaleString();
  }

  function trackingText(t) {
    if (!t || t.state === "none") return "no placement published by the console";
    const gen = `generation ${t.generation}`;
    switch (t.state) {
      case "applied":
        return `${gen}: applied`;
      case "pending":
        return `${gen}: pending${t.reason ? " (" + t.reason + ")" : ""}`;
      case "refused":
        return `${gen}: refused: ${t.reason}`;
      case "failed":
        return `${gen}: applied with failures: ${t.reason}`;
      case "superseded":
        return `${gen}: superseded (${t.reason})`;
      default:
        return `${gen}: ${t.state}`;
    }
  }

  // An EventSource that reloads the full state whenever it reconnects: events missed while
  // disconnected are not replayed, so the page refetches instead. The first load does not wait.
  function live(url, handlers, onOpen) {
    const dot = document.getElementById("live");
    let source = null;
    let hellos = 0;
    onOpen();
    function connect() {
      source = new EventSource(url);
      source.addEventListener("hello", () => {
        if (dot) dot.classList.add("on");
        if (hellos++ > 0) onOpen();
      });
      for (const [name, fn] of Object.entries(handlers)) {
        source.addEventListener(name, (ev) => fn(JSON.parse(ev.data)));
      }
      source.onerror = () => {
        if (dot) dot.classList.remove("on");
      };
    }
    connect();
    return () => source && source.close();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const out = document.getElementById("logout");
    if (out)
      out.addEventListener("click", async () => {
        try {
          await api("POST", "/api/logout");
        } finally {
          location.href = "/login";
        }
      });
  });

  return { api, esc, num, age, csrf, role, isAdmin: role === "admin", trackingText, live, meta };
})();

// The rollouts page (docs/fleet.md#rollouts): every rollout, and the chosen one's waves with their
// devices (targeted / applied / succeeded / failed / rolled back), the gate figures that decided,
// and its timeline. Refreshed every 2 s while the page is open; ?id=<rollout> picks one.
"use strict";

(() => {
  const body = document.getElementById("rollouts-body");
  const panel = document.getElementById("rollout");
  let chosen = new URLSearchParams(location.search).get("id");

  const pct = (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)}%`);
  const counts = (c) =>
    Object.entries(c)
      .sort()
      .map(([k, v]) => `<span class="state-${EC.esc(k)}">${EC.esc(k.replace(/_/g, " "))} ${v}</span>`)
      .join(" ");
  const change = (c) =>
    c.model ? `${c.model} ${Object.entries(c.set || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(" ")}` : `placement of ${(c.tenants || []).length} tenants`;

  async function loadList() {
    const rows = await EC.api("GET", "/api/rollouts");
    if (!chosen && rows.length) chosen = rows[0].id;
    body.innerHTML = rows.length
      ? rows
          .map(
            (r) =>
              `<tr data-id="${EC.esc(r.id)}" class="${r.id === chosen ? "chosen" : ""}">` +
              `<td><a href="?id=${encodeURIComponent(r.id)}">${EC.esc(r.name || r.id)}</a></td>` +
              `<td class="ro-state">${EC.esc(r.state.replace(/_/g, " "))}</td><td>${EC.esc(change(r.change))}</td>` +
              `<td>${EC.esc(r.selector)} (${r.devices})</td><td class="num">${r.current_wave + 1}/${r.waves}</td>` +
              `<td>${counts(r.counts)}</td><td>${EC.esc(EC.age(r.created_at))} by ${EC.esc(r.created_by)}</td></tr>`,
          )
          .join("")
      : '<tr><td colspan="7">no rollouts yet</td></tr>';
  }

  function figuresText(f) {
    if (!f || f.error_rate === undefined) return "";
    return (
      `errors ${pct(f.error_rate)} · p95 ${EC.num(f.p95_ms)} ms (${f.p95_factor === null ? "–" : f.p95_factor + "×"}) · ` +
      `fps ${EC.num(f.fps)} (${f.throughput_ratio === null ? "–" : Math.round(f.throughput_ratio * 100) + "%"})` +
      (f.failovers ? ` · failovers ${f.failovers}` : "")
    );
  }

  async function loadOne() {
    if (!chosen) return;
    const r = await EC.api("GET", `/api/rollouts/${encodeURIComponent(chosen)}`);
    panel.hidden = false;
    document.getElementById("ro-title").textContent = `${r.name || r.id}: ${change(r.change)} on ${r.selector}`;
    document.getElementById("ro-state").innerHTML =
      `<b id="ro-state-text">${EC.esc(r.state.replace(/_/g, " "))}</b> · wave ${r.current_wave + 1} of ${r.waves} · ` +
      counts(r.counts) +
      (r.failed_at && r.rolled_back_at ? ` · rolled back in ${(r.rolled_back_at - r.failed_at).toFixed(1)} s` : "");
    document.getElementById("ro-reason").textContent = r.reason || "";
    document.getElementById("ro-waves-list").innerHTML = r.wave_list
      .map((w) => {
        const worst = `worst: errors ${pct(w.figures.worst_error_rate)}, p95 ${w.figures.worst_p95_factor ?? "–"}×, throughput ${w.figures.worst_throughput_ratio ?? "–"}`;
        const rows = w.devices
          .slice(0, 200)
          .map(
            (d) =>
              `<tr data-device="${EC.esc(d.device_id)}"><td><a href="/devices/${encodeURIComponent(d.device_id)}">${EC.esc(d.device_id)}</a></td>` +
              `<td class="dev-state state-${EC.esc(d.state)}">${EC.esc(d.state.replace(/_/g, " "))}${d.deferred ? " (was offline)" : ""}</td>` +
              `<td>${EC.esc(figuresText(d.figures))}</td><td>${EC.esc(d.reason)}</td></tr>`,
          )
          .join("");
        const more = w.devices.length > 200 ? `<tr><td colspan="4">… ${w.devices.length - 200} more</td></tr>` : "";
        return (
          `<details class="wave" id="wave-${w.index + 1}" ${w.state === "running" || w.state === "failed" ? "open" : ""}>` +
          `<summary>wave ${w.index + 1} (${EC.esc(w.size)}): ${w.devices.length} devices, <b class="wave-state">${EC.esc(w.state)}</b> · ${EC.esc(worst)}` +
          `${w.reason ? " · " + EC.esc(w.reason) : ""}</summary>` +
          `<table class="grid"><thead><tr><th>device</th><th>state</th><th>gate figures</th><th>reason</th></tr></thead><tbody>${rows}${more}</tbody></table></details>`
        );
      })
      .join("");
    document.getElementById("ro-timeline").innerHTML = r.timeline
      .map((e) => `<li><time>${EC.esc(new Date(e.ts * 1000).toLocaleTimeString())}</time> ${EC.esc(e.message)}</li>`)
      .join("");
  }

  async function refresh() {
    try {
      await loadList();
      await loadOne();
    } catch (err) {
      document.getElementById("ro-reason").textContent = String(err.message || err);
    }
  }

  document.getElementById("ro-actions").addEventListener("click", async (ev) => {
    const op = ev.target.dataset && ev.target.dataset.op;
    if (!op || !chosen) return;
    try {
      await EC.api("POST", `/api/rollouts/${encodeURIComponent(chosen)}/${op}`);
    } catch (err) {
      alert(`${op}: ${err.message}`);
    }
    await refresh();
  });

  const form = document.getElementById("create-form");
  if (form) {
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const value = (id) => document.getElementById(id).value.trim();
      const set = {};
      if (value("ro-version")) set.version = value("ro-version");
      const spec = {
        selector: value("ro-selector") || "*",
        change: { model: value("ro-model"), set },
        waves: value("ro-waves"),
        gates: { soak_s: Number(value("ro-soak") || 60) },
        promotion: document.getElementById("ro-manual").checked ? "manual" : "auto",
      };
      const result = document.getElementById("create-result");
      try {
        const r = await EC.api("POST", "/api/rollouts", spec);
        chosen = r.id;
        result.textContent = `started ${r.id}: ${r.devices} devices in ${r.waves} waves`;
        history.replaceState(null, "", `?id=${encodeURIComponent(r.id)}`);
      } catch (err) {
        result.textContent = `not started: ${err.message}`;
      }
      await refresh();
    });
  }

  refresh();
  setInterval(refresh, 2000);
})();

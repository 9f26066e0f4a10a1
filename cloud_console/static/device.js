// Device page: facts, live charts (uPlot, served by the console), tenants, capabilities,
// the placement editor (offers only what the device reports it can run) and where a placement stands.
"use strict";

(() => {
  const deviceId = EC.meta("device-id");
  const base = `/api/devices/${encodeURIComponent(deviceId)}`;
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d"];
  const MAX_POINTS = 1200;

  let detail = null;
  let editorRows = [];
  let editorDirty = false;
  let editorSource = "";

  // -- facts, tenants, capabilities, errors -----------------------------------------------------
  function renderFacts() {
    const s = detail.summary;
    const st = detail.status || {};
    const tel = detail.telemetry;
    const host = tel ? tel.device : null;
    const badge = !s.online
      ? '<span class="badge offline">offline</span>'
      : s.stale
        ? '<span class="badge stale">stale</span>'
        : '<span class="badge online">online</span>';
    const facts = [
      ["state", badge],
      ["last seen", EC.esc(EC.age(s.last_seen))],
      ["agent", EC.esc(st.agent_version || "–")],
      ["started", st.started_at ? EC.esc(new Date(st.started_at * 1000).toLocaleString()) : "–"],
      ["applied generation", `<span id="applied-generation">${EC.esc(s.applied_generation ?? "–")}</span>`],
      ["CPU", host ? `${EC.num(host.cpu_percent)} %` : "–"],
      ["RSS", host ? `${EC.num(host.rss_mb, 0)} MB` : "–"],
      ["load 1m", host && host.load_1m !== null ? EC.num(host.load_1m, 2) : "–"],
      ["temperature", host && host.temperature_c !== null ? `${EC.num(host.temperature_c)} °C` : "–"],
    ];
    document.getElementById("facts").innerHTML = facts
      .map(([k, v]) => `<div class="fact"><span>${k}</span><b>${v}</b></div>`)
      .join("");
  }

  // Failover candidates (docs/protocol.md): in order, the serving one marked, the recent moves.
  function candidatesOf(t) {
    if (!t.candidates) return "";
    const list = t.candidates
      .map((c) => {
        const s = (t.serving || "").toLowerCase();
        const on = s === c.toLowerCase() || s === `${c.toLowerCase()}:0`;
        return `<span class="candidate${on ? " serving" : ""}">${EC.esc(c)}</span>`;
      })
      .join(" → ");
    const moves = (t.failovers || [])
      .slice()
      .reverse()
      .map(
        (m) =>
          `<li>${EC.esc(new Date(m.ts * 1000).toLocaleString())} <b>${EC.esc(m.kind)}</b> ` +
          `${EC.esc(m.from)} → ${EC.esc(m.to)}` +
          `${m.recovery_s != null ? ` (serving again in ${EC.num(m.recovery_s, 2)} s)` : ""}: ${EC.esc(m.reason)}</li>`,
      )
      .join("");
    return (
      `<div class="candidates">candidates: ${list}${t.preferred ? "" : ' <span class="chip not-preferred">not on its preferred candidate</span>'}</div>` +
      (moves ? `<details class="failovers"><summary>failover history (${t.failovers.length})</summary><ul>${moves}</ul></details>` : "")
    );
  }

  function renderTenants() {
    const rows = detail.summary.tenants;
    document.getElementById("tenants-body").innerHTML = rows.length
      ? rows
          .map(
            (t) =>
              `<tr data-model="${EC.esc(t.model)}" data-backend="${EC.esc(t.backend)}" data-state="${EC.esc(t.state)}">` +
              `<td>${EC.esc(t.model)}${candidatesOf(t)}</td><td>${EC.esc(t.backend)}</td><td>${EC.esc(t.device)}</td>` +
              `<td>${t.instances}</td><td><span class="chip state-${EC.esc(t.state)}">${EC.esc(t.state)}</span></td>` +
              `<td class="num">${EC.num(t.fps)}</td><td class="num">${EC.num(t.p95_ms)}</td>` +
              `<td class="num on-time">${t.objective_share != null ? EC.num(100 * t.objective_share) + " %" : "–"}</td>` +
              `<td class="num">${t.queue_depth ?? "–"}</td><td class="num">${t.drops ?? "–"}</td>` +
              `<td class="num">${t.errors ?? "–"}</td><td class="error">${EC.esc(t.error || "")}</td></tr>`,
          )
          .join("")
      : '<tr><td colspan="12" class="muted">no tenants</td></tr>';
  }

  // Detection tenants: the labels and scores of the last frame each one served (telemetry).
  function renderDetections() {
    const tel = detail && detail.telemetry;
    const rows = tel ? tel.tenants.filter((t) => Array.isArray(t.last_detections)) : [];
    let el = document.getElementById("detections");
    if (!rows.length) {
      if (el) el.closest("section").remove();
      return;
    }
    if (!el) {
      const section = document.createElement("section");
      section.innerHTML = '<h2>Last detections</h2><div id="detections"></div>';
      document.getElementById("tenants").closest("section").after(section);
      el = document.getElementById("detections");
    }
    el.innerHTML = rows
      .map(
        (t) =>
          `<div class="detections" data-model="${EC.esc(t.model)}"><strong>${EC.esc(t.model)}</strong>: ` +
          (t.last_detections.length
            ? t.last_detections.map((d) => `<span class="chip">${EC.esc(d.label)} ${EC.num(d.score, 2)}${classOf(d)}</span>`).join(" ")
            : '<span class="muted">nothing found</span>') +
          "</div>",
      )
      .join("");
  }

  // A cascade's classifier on the box (docs/detection.md "Cascades"): its best class.
  function classOf(d) {
    const c = Array.isArray(d.classes) && d.classes[0];
    return c ? ` <span class="class" title="classified">&rarr; ${EC.esc(c.label)} ${EC.num(c.score, 2)}</span>` : "";
  }

  function renderCapabilities() {
    const caps = detail.capabilities;
    const el = document.getElementById("capabilities");
    if (!caps) {
      el.innerHTML = '<p class="muted">not reported yet</p>';
      return;
    }
    const backends = Object.entries(caps.backends)
      .map(
        ([name, b]) =>
          `<tr class="${b.available ? "" : "is-offline"}"><td>${EC.esc(name)}</td>` +
          `<td>${b.available ? "yes" : "no"}</td><td>${EC.esc(b.devices.join(", "))}</td>` +
          `<td class="muted">${EC.esc(b.reason)}</td></tr>`,
      )
      .join("");
    el.innerHTML =
      `<table class="grid" id="backends"><thead><tr><th>backend</th><th>available</th><th>devices</th>` +
      `<th>reason</th></tr></thead><tbody>${backends}</tbody></table>` +
      `<p>models: <span id="models">${EC.esc(caps.models.join(", ") || "–")}</span></p>` +
      renderVersions(caps);
  }

  // Installed versions and the last deliveries (docs/fleet.md), from the device's status.
  function renderVersions(caps) {
    const versions = (caps.installed || [])
      .map((m) => `${m.name} ${m.versions.map((v) => v.version).join(", ")}`)
      .join("; ");
    const deliveries = (caps.deliveries || [])
      .map((d) => {
        const pct = d.bytes_total ? ` ${Math.floor((100 * d.bytes_done) / d.bytes_total)}%` : "";
        return `${d.model} ${d.version}: ${d.state}${d.state === "downloading" ? pct : ""}${d.error ? ` (${d.error})` : ""}`;
      })
      .join("; ");
    return (
      `<p>versions: <span id="versions">${EC.esc(versions || "–")}</span></p>` +
      (deliveries ? `<p>deliveries: <span id="deliveries">${EC.esc(deliveries)}</span></p>` : "")
    );
  }

  function renderErrors() {
    const errors = ((detail.status || {}).errors || []).slice().reverse();
    document.getElementById("errors").innerHTML = errors.length
      ? errors.map((e) => `<li>${EC.esc(e)}</li>`).join("")
      : '<li class="muted">none</li>';
  }

  function renderTracking(tracking) {
    const el = document.getElementById("placement-state");
    el.textContent = EC.trackingText(tracking);
    el.dataset.state = tracking.state;
    el.dataset.generation = tracking.generation ?? "";
    el.className = `placement-state pl-${tracking.state}`;
  }

  async function loadHistory() {
    const data = await EC.api("GET", `${base}/placements`);
    document.getElementById("history-body").innerHTML = data.placements.length
      ? data.placements
          .map((p) => {
            let doc = {};
            try {
              doc = JSON.parse(p.document);
            } catch (_) {
              doc = { tenants: [] };
            }
            const tenants = doc.tenants
              .map((t) => `${t.model} → ${t.backend}:${t.device}${t.instances > 1 ? " ×" + t.instances : ""}`)
              .join(", ");
            return (
              `<tr><td>${EC.esc(new Date(p.ts * 1000).toLocaleString())}</td><td>${p.generation}</td>` +
              `<td>${EC.esc(p.user)}</td><td>${EC.esc(p.action)}</td><td>${EC.esc(tenants)}</td></tr>`
            );
          })
          .join("")
      : '<tr><td colspan="5" class="muted">none</td></tr>';
  }

  // -- the placement editor ----------------------------------------------------------------------
  function availableBackends() {
    const caps = detail.capabilities;
    if (!caps) return {};
    return Object.fromEntries(Object.entries(caps.backends).filter(([, b]) => b.available));
  }

  function options(values, selected) {
    return values
      .map((v) => `<option value="${EC.esc(v)}"${v === selected ? " selected" : ""}>${EC.esc(v)}</option>`)
      .join("");
  }

  function normalise(row) {
    // Keep the row within what the device offers: a backend it has, a device of that backend.
    const backends = availableBackends();
    const names = Object.keys(backends);
    if (!names.includes(row.backend)) row.backend = names[0] || row.backend;
    const devices = backends[row.backend] ? backends[row.backend].devices : [];
    const match = devices.find((d) => d.toLowerCase() === String(row.device).toLowerCase());
    row.device = match || devices[0] || row.device;
    return row;
  }

  function renderEditor() {
    const caps = detail.capabilities || { models: [], backends: {} };
    const backends = availableBackends();
    const disabled = EC.isAdmin ? "" : " disabled";
    document.getElementById("editor-body").innerHTML = editorRows.length
      ? editorRows
          .map((r, i) => {
            const devices = backends[r.backend] ? backends[r.backend].devices : [];
            return (
              `<tr data-row="${i}" data-model="${EC.esc(r.model)}">` +
              `<td><select class="ed-model" data-field="model"${disabled}>${options(caps.models, r.model)}</select></td>` +
              `<td><input class="ed-version" data-field="version" size="8" placeholder="newest" value="${EC.esc(r.version ?? "")}"${disabled}></td>` +
              `<td><select class="ed-backend" data-field="backend"${disabled}>${options(Object.keys(backends), r.backend)}</select></td>` +
              `<td><select class="ed-device" data-field="device"${disabled}>${options(devices, r.device)}</select></td>` +
              `<td><input class="ed-instances" data-field="instances" type="number" min="1" max="32" value="${r.instances}"${disabled}></td>` +
              `<td><input class="ed-threads" data-field="threads" type="number" min="1" max="256" placeholder="auto" value="${r.threads ?? ""}"${disabled}></td>` +
              `<td><input class="ed-batch" data-field="max_size" type="number" min="1" max="256" value="${r.batch.max_size}"${disabled}></td>` +
              `<td><input class="ed-delay" data-field="max_delay_ms" type="number" min="0" max="1000" step="0.5" value="${r.batch.max_delay_ms}"${disabled}></td>` +
              `<td>${EC.isAdmin ? '<button type="button" class="ed-remove link">remove</button>' : ""}</td></tr>`
            );
          })
          .join("")
      : '<tr><td colspan="9" class="muted">no tenants: add one</td></tr>';
  }

  function syncEditor(force) {
    const source = JSON.stringify(detail.editable_tenants);
    if (force || (!editorDirty && source !== editorSource)) {
      editorSource = source;
      editorRows = detail.editable_tenants.map((t) => normalise(structuredClone(t)));
      editorDirty = false;
      renderEditor();
    }
  }

  function message(text, kind) {
    const el = document.getElementById("editor-message");
    el.textContent = text;
    el.className = `result ${kind || ""}`;
  }

  const editorBody = document.getElementById("editor-body");
  editorBody.addEventListener("change", (ev) => {
    const tr = ev.target.closest("tr[data-row]");
    if (!tr) return;
    const row = editorRows[Number(tr.dataset.row)];
    const field = ev.target.dataset.field;
    const value = ev.target.value;
    editorDirty = true;
    if (field === "instances") row.instances = Number(value);
    else if (field === "threads") row.threads = value === "" ? null : Number(value);
    else if (field === "max_size") row.batch.max_size = Number(value);
    else if (field === "max_delay_ms") row.batch.max_delay_ms = Number(value);
    else if (field === "version") row.version = value.trim() || null;
    else row[field] = value;
    if (field === "backend" || field === "model") {
      normalise(row);
      renderEditor();
    }
  });
  editorBody.addEventListener("click", (ev) => {
    if (!ev.target.classList.contains("ed-remove")) return;
    editorRows.splice(Number(ev.target.closest("tr").dataset.row), 1);
    editorDirty = true;
    renderEditor();
  });

  document.getElementById("add-tenant").addEventListener("click", () => {
    const caps = detail.capabilities || { models: [] };
    const used = new Set(editorRows.map((r) => r.model));
    const model = caps.models.find((m) => !used.has(m));
    if (!model) {
      message("every model of the device already has a tenant", "error");
      return;
    }
    editorRows.push(
      normalise({ model, backend: "", device: "", instances: 1, threads: null, batch: { max_size: 1, max_delay_ms: 0 } }),
    );
    editorDirty = true;
    renderEditor();
  });

  document.getElementById("reset-editor").addEventListener("click", () => {
    syncEditor(true);
    message("");
  });

  // Versions the placement pins that the device has not installed: the console delivers them first.
  function toDeliver(body) {
    const caps = (detail && detail.capabilities) || {};
    const have = new Set((caps.installed || []).flatMap((m) => m.versions.map((v) => `${m.name} ${v.version}`)));
    return ((body && body.tenants) || []).filter((t) => t.version && !have.has(`${t.model} ${t.version}`));
  }

  async function publish(method, path, body, what) {
    const missing = toDeliver(body).map((t) => `${t.model} ${t.version}`);
    message(missing.length ? `delivering ${missing.join(", ")} to the device first, then publishing…` : "publishing…");
    try {
      const res = await EC.api(method, path, body);
      editorDirty = false;
      message(`published generation ${res.generation}${what}; waiting for the device…`, "ok");
      // The device may have answered (over the event stream) before this response arrived: show the
      // console's current view rather than the response's snapshot.
      onDevice(await EC.api("GET", base));
      setTimeout(() => loadHistory().catch(() => {}), 1500);
    } catch (err) {
      message(`${err.status === 403 ? "not allowed" : "refused"}: ${err.message}`, "error");
    }
  }

  document.getElementById("apply-placement").addEventListener("click", () =>
    publish("PUT", `${base}/placement`, { tenants: editorRows }, ""),
  );
  document.getElementById("auto-place").addEventListener("click", () =>
    publish("POST", `${base}/auto-place`, undefined, ' with backend "auto"'),
  );

  if (!EC.isAdmin) {
    for (const id of ["add-tenant", "apply-placement", "auto-place", "reset-editor"]) {
      document.getElementById(id).hidden = true;
    }
  }

  // -- charts ------------------------------------------------------------------------------------
  const METRICS = [
    ["fps", "chart-fps"],
    ["p95_ms", "chart-p95"],
    ["queue_depth", "chart-queue"],
  ];
  let models = [];
  const xs = [];
  const ys = { fps: {}, p95_ms: {}, queue_depth: {} };
  const charts = {};

  function chartData(metric) {
    return [xs, ...models.map((m) => ys[metric][m])];
  }

  function buildCharts() {
    for (const [metric, id] of METRICS) {
      const el = document.getElementById(id);
      if (charts[metric]) charts[metric].destroy();
      const opts = {
        width: Math.max(300, el.clientWidth - 8),
        height: 170,
        scales: { x: { time: true } },
        series: [{}, ...models.map((m, i) => ({ label: m, stroke: COLORS[i % COLORS.length], width: 2 }))],
        axes: [{}, { size: 50 }],
      };
      charts[metric] = new uPlot(opts, chartData(metric), el);
    }
  }

  function addPoint(ts, tenants) {
    if (xs.length && ts <= xs[xs.length - 1]) return; // history and live overlap: keep order
    let rebuild = false;
    for (const m of Object.keys(tenants)) {
      if (!models.includes(m)) {
        models.push(m);
        for (const metric of Object.keys(ys)) ys[metric][m] = new Array(xs.length).fill(null);
        rebuild = true;
      }
    }
    xs.push(ts);
    for (const metric of Object.keys(ys)) {
      for (const m of models) ys[metric][m].push(tenants[m] ? tenants[m][metric] : null);
    }
    if (xs.length > MAX_POINTS) {
      xs.shift();
      for (const metric of Object.keys(ys)) for (const m of models) ys[metric][m].shift();
    }
    return rebuild;
  }

  function redraw(rebuild) {
    if (rebuild || !charts.fps) buildCharts();
    else for (const [metric] of METRICS) charts[metric].setData(chartData(metric));
  }

  let historyLoaded = false;
  const early = []; // live points that arrived before the history

  async function loadHistoryPoints() {
    const data = await EC.api("GET", `${base}/telemetry?window_s=600`);
    for (const p of data.points) addPoint(p.ts, p.tenants);
    historyLoaded = true;
    for (const [ts, tenants] of early.splice(0)) addPoint(ts, tenants);
    redraw(true);
  }

  function onTelemetry(tel) {
    const tenants = {};
    for (const t of tel.tenants) {
      tenants[t.model] = { fps: t.fps, p95_ms: t.latency_ms.p95, queue_depth: t.queue_depth };
    }
    if (historyLoaded) redraw(addPoint(tel.ts, tenants));
    else early.push([tel.ts, tenants]);
    if (!detail) return;
    // Live columns of the tenants table.
    detail.telemetry = tel;
    for (const row of detail.summary.tenants) {
      const t = tel.tenants.find(
        (x) => x.model === row.model && x.backend === row.backend && x.device.toLowerCase() === row.device.toLowerCase(),
      );
      if (t && row.state !== "draining") {
        Object.assign(row, { fps: t.fps, p95_ms: t.latency_ms.p95, queue_depth: t.queue_depth, drops: t.drops, errors: t.errors, objective_share: t.objective_share });
      }
    }
    detail.summary.last_seen = Date.now() / 1000;
    renderTenants();
    renderFacts();
    renderDetections();
  }

  window.addEventListener("resize", () => {
    for (const [metric, id] of METRICS) {
      if (charts[metric]) charts[metric].setSize({ width: Math.max(300, document.getElementById(id).clientWidth - 8), height: 170 });
    }
  });

  // -- wiring ------------------------------------------------------------------------------------
  function onDevice(d) {
    if (detail && d.seq < detail.seq) return; // an older view than the one shown (raced a live event)
    detail = d;
    renderFacts();
    renderTenants();
    renderCapabilities();
    renderDetections();
    renderErrors();
    renderTracking(d.tracking);
    syncEditor(false);
    document.body.dataset.loaded = "1";
  }

  async function load() {
    const fresh = await EC.api("GET", base);
    detail = null; // a full reload (e.g. after the console restarted and its counters began again)
    onDevice(fresh);
    await Promise.all([loadHistory(), historyLoaded ? null : loadHistoryPoints()]);
  }

  EC.live(`/api/events?device=${encodeURIComponent(deviceId)}`, { device: onDevice, telemetry: onTelemetry }, () =>
    load().catch((e) => message(`could not load: ${e.message}`, "error")),
  );
})();

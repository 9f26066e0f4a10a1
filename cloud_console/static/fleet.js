// Fleet page: the table of devices, sortable and filterable, updated live; the fleet-wide move.
"use strict";

(() => {
  const rows = new Map(); // device_id -> summary
  let stats = {};
  let sortKey = "device_id";
  let descending = false;
  let pending = false;

  const body = document.getElementById("fleet-body");
  const filter = document.getElementById("filter");
  const onlineFilter = document.getElementById("online-filter");

  function tenantChips(r) {
    if (!r.tenants.length) return '<span class="muted">none</span>';
    return r.tenants
      .map(
        (t) =>
          `<span class="chip state-${EC.esc(t.state)}" title="${EC.esc(t.error || "")}">` +
          `${EC.esc(t.model)} <b>${EC.esc(t.backend)}:${EC.esc(t.device)}</b>` +
          `${t.instances > 1 ? " ×" + t.instances : ""} <i>${EC.esc(t.state)}</i>` +
          (t.preferred === false ? notPreferred(t) : "") +
          "</span>",
      )
      .join(" ");
  }

  // A tenant that failed over and serves on a later candidate than its first (docs/protocol.md).
  function notPreferred(t) {
    const last = (t.failovers || []).slice(-1)[0];
    const why = last ? `${last.kind} ${last.from} → ${last.to}: ${last.reason}` : "";
    return ` <span class="not-preferred" title="${EC.esc(why)}">not on ${EC.esc(t.candidates[0])}</span>`;
  }

  function isStale(r) {
    // A silent device sends no updates, so the page ages it itself.
    const limit = stats.stale_after_s || 30;
    return r.online && (r.stale || Date.now() / 1000 - r.last_seen > limit);
  }

  function stateCell(r) {
    if (!r.online) return '<span class="badge offline">offline</span>';
    if (isStale(r)) return '<span class="badge stale">stale</span>';
    return '<span class="badge online">online</span>';
  }

  function placementCell(r) {
    const t = r.placement || {};
    const applied = r.applied_generation ?? "–";
    if (!t.state || t.state === "none") return `<span title="applied generation">${applied}</span>`;
    // "3 applied" when the console's latest is what runs; "3 → 4 refused" while it is not.
    const target = t.generation === r.applied_generation ? "" : ` → ${t.generation}`;
    return (
      `<span class="pl pl-${EC.esc(t.state)}" title="${EC.esc(EC.trackingText(t))}">` +
      `${applied}${target} <i>${EC.esc(t.state)}</i></span>`
    );
  }

  function haystack(r) {
    return [r.device_id, ...r.tenants.flatMap((t) => [t.model, t.backend, t.device, t.state])]
      .join(" ")
      .toLowerCase();
  }

  // A filter with `=` or `!` is a selector of tags and ids (docs/fleet.md#selectors): the console
  // says which devices it matches; the fleet move then goes to those only.
  let selected = null;
  let selectorTimer = null;
  const isSelector = (text) => /[=!]/.test(text);
  async function applySelector() {
    const text = filter.value.trim();
    if (!isSelector(text)) {
      selected = null;
      filter.classList.remove("bad");
      schedule();
      return;
    }
    try {
      const res = await EC.api("GET", "/api/selectors/match?selector=" + encodeURIComponent(text));
      selected = new Set(res.devices);
      filter.classList.remove("bad");
      filter.title = "";
    } catch (err) {
      selected = new Set();
      filter.classList.add("bad");
      filter.title = err.message;
    }
    schedule();
  }

  function visible() {
    const needle = filter.value.trim().toLowerCase();
    const want = onlineFilter.value;
    let list = [...rows.values()];
    if (want) list = list.filter((r) => r.online === (want === "online"));
    if (selected !== null) list = list.filter((r) => selected.has(r.device_id));
    else if (needle) list = list.filter((r) => haystack(r).includes(needle));
    const dir = descending ? -1 : 1;
    list.sort((a, b) => {
      const x = a[sortKey] ?? -Infinity;
      const y = b[sortKey] ?? -Infinity;
      if (x < y) return -dir;
      if (x > y) return dir;
      return a.device_id < b.device_id ? -1 : 1;
    });
    return list;
  }

  function render() {
    pending = false;
    const list = visible();
    body.innerHTML = list.length
      ? list
          .map(
            (r) =>
              `<tr data-device="${EC.esc(r.device_id)}" class="${r.online ? "" : "is-offline"}">` +
              `<td><a href="/devices/${encodeURIComponent(r.device_id)}">${EC.esc(r.device_id)}</a></td>` +
              `<td>${stateCell(r)}</td>` +
              `<td class="age">${EC.esc(EC.age(r.last_seen))}</td>` +
              `<td class="tenants">${tenantChips(r)}</td>` +
              `<td class="num">${EC.num(r.fps)}</td>` +
              `<td class="num">${EC.num(r.p95_ms)}</td>` +
              `<td class="num">${r.queue_depth}</td>` +
              `<td class="num" title="${EC.esc(r.last_error || "")}">${r.errors}` +
              `${r.status_errors ? ` <span class="warn">+${r.status_errors}</span>` : ""}</td>` +
              `<td class="num">${r.drops}</td>` +
              `<td class="num">${placementCell(r)}</td></tr>`,
          )
          .join("")
      : '<tr><td colspan="10" class="muted">no devices</td></tr>';
    const online = [...rows.values()].filter((r) => r.online).length;
    document.getElementById("counts").textContent =
      `${rows.size} devices, ${online} online, ${list.length} shown`;
    document.getElementById("ingest").textContent = stats.received
      ? `ingest ${stats.messages_per_s} msg/s, backlog ${stats.backlog}`
      : "";
    for (const th of document.querySelectorAll("th[data-sort]")) {
      th.classList.toggle("sorted", th.dataset.sort === sortKey);
      th.classList.toggle("desc", th.dataset.sort === sortKey && descending);
    }
    document.body.dataset.rendered = String(list.length);
  }

  function schedule() {
    if (!pending) {
      pending = true;
      requestAnimationFrame(render);
    }
  }

  async function load() {
    const data = await EC.api("GET", "/api/devices");
    rows.clear();
    for (const r of data.devices) rows.set(r.device_id, r);
    stats = data.stats;
    render();
    loadMoveOptions();
  }

  function onFleet(ev) {
    for (const r of ev.devices) rows.set(r.device_id, r);
    for (const id of ev.removed) rows.delete(id);
    stats = ev.stats;
    schedule();
  }

  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.addEventListener("click", () => {
      if (sortKey === th.dataset.sort) descending = !descending;
      else {
        sortKey = th.dataset.sort;
        descending = false;
      }
      render();
    });
  }
  filter.addEventListener("input", () => {
    clearTimeout(selectorTimer);
    if (isSelector(filter.value.trim())) selectorTimer = setTimeout(applySelector, 250);
    else applySelector();
  });
  onlineFilter.addEventListener("change", schedule);

  // -- fleet-wide move (admin) ------------------------------------------------------------------
  const moveForm = document.getElementById("move-form");
  let options = { models: [], backends: {}, running: [] };

  function fillSelect(sel, values) {
    const keep = sel.value;
    sel.innerHTML = values.map((v) => `<option>${EC.esc(v)}</option>`).join("");
    if (values.includes(keep)) sel.value = keep;
  }

  function refreshMoveChoices() {
    const model = document.getElementById("move-model").value;
    const from = options.running.filter((r) => r.model === model).map((r) => r.backend);
    fillSelect(document.getElementById("move-from"), [...new Set(from)]);
    fillSelect(document.getElementById("move-to"), [...Object.keys(options.backends), "auto"]);
  }

  async function loadMoveOptions() {
    if (!EC.isAdmin) return;
    options = await EC.api("GET", "/api/fleet/capabilities");
    const running = [...new Set(options.running.map((r) => r.model))];
    fillSelect(document.getElementById("move-model"), running);
    refreshMoveChoices();
  }

  document.getElementById("move-model").addEventListener("change", refreshMoveChoices);
  document.getElementById("move-panel").addEventListener("toggle", loadMoveOptions);
  moveForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const out = document.getElementById("move-result");
    out.textContent = "publishing…";
    try {
      const res = await EC.api("POST", "/api/fleet/move", {
        model: document.getElementById("move-model").value,
        from_backend: document.getElementById("move-from").value,
        to_backend: document.getElementById("move-to").value,
        to_device: document.getElementById("move-device").value.trim() || null,
        selector: selected !== null ? filter.value.trim() : "",
      });
      const skipped = res.skipped.length
        ? `; skipped ${res.skipped.length}: ` +
          res.skipped
            .slice(0, 5)
            .map((s) => `${s.device_id} (${s.reason})`)
            .join(", ")
        : "";
      out.textContent = `published to ${res.published.length} device(s)${skipped}`;
      out.className = "result ok";
    } catch (err) {
      out.textContent = `refused: ${err.message}`;
      out.className = "result error";
    }
  });

  EC.live("/api/events", { fleet: onFleet }, () => load().catch((e) => console.error(e)));
  // Ages ("3 s ago") drift even when nothing arrives.
  setInterval(schedule, 5000);
})();

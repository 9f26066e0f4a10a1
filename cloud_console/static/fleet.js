// Fleet page: one page of the fleet table at a time, filtered and sorted by the server
// (GET /api/devices), fleet-wide counts above it; live updates for the rows on screen; the fleet-wide move.
"use strict";

(() => {
  const FILTERS = ["q", "state", "model", "backend", "tag", "placement"];
  const params = new URLSearchParams(location.search);
  const query = {
    q: params.get("q") || "",
    state: params.get("state") || "",
    model: params.get("model") || "",
    backend: params.get("backend") || "",
    tag: params.get("tag") || "",
    placement: params.get("placement") || "",
    failover: params.get("failover") === "true",
    sort: params.get("sort") || "device_id",
    desc: params.get("desc") === "true",
    offset: Math.max(0, Number(params.get("offset")) || 0),
    limit: [50, 100, 250, 500].includes(Number(params.get("limit"))) ? Number(params.get("limit")) : 100,
  };
  let order = []; // device ids of this page, in the server's order
  const rows = new Map(); // device_id -> row, for this page only
  let counts = {};
  let stats = {};
  let matched = 0;
  let total = 0;
  let streamId = null;
  let loads = 0; // answers to older queries are dropped
  let facetsLoaded = false;
  let pending = false;
  let reloadTimer = null;

  const body = document.getElementById("fleet-body");
  const el = (id) => document.getElementById(id);
  const filter = el("filter");
  const tagFilter = el("tag-filter");

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
    if (r.silent) {
      const why = `nothing heard for over ${stats.offline_after_s || 90} s (its last will may be on another broker node)`;
      return `<span class="badge offline" title="${EC.esc(why)}">offline</span>`;
    }
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

  // A filter with `=` or `!` is a selector of tags and ids (docs/fleet.md#selectors); the fleet move
  // then goes to the devices it matches only.
  const isSelector = (text) => /[=!]/.test(text.trim());

  function queryString() {
    const out = new URLSearchParams();
    for (const name of FILTERS) if (query[name].trim()) out.set(name, query[name].trim());
    if (isSelector(query.q)) {
      out.delete("q");
      out.set("selector", query.q.trim());
    }
    if (query.failover) out.set("failover", "true");
    if (query.sort !== "device_id") out.set("sort", query.sort);
    if (query.desc) out.set("desc", "true");
    if (query.offset) out.set("offset", String(query.offset));
    if (query.limit !== 100) out.set("limit", String(query.limit));
    return out.toString();
  }

  async function load() {
    const mine = ++loads;
    const qs = queryString();
    history.replaceState(null, "", qs ? `?${qs}` : location.pathname);
    const data = await EC.api("GET", `/api/devices${qs ? "?" + qs : ""}`);
    if (mine !== loads) return;
    if (!data.devices.length && query.offset > 0 && data.matched > 0) {
      // Past the end (devices went away): the last page instead.
      query.offset = Math.floor((data.matched - 1) / query.limit) * query.limit;
      return load();
    }
    order = data.devices.map((r) => r.device_id);
    rows.clear();
    for (const r of data.devices) rows.set(r.device_id, r);
    ({ counts, stats, matched, total } = data);
    render();
    watch();
    if (!facetsLoaded) {
      // The filter choices (models, backends with their device counts) after the first rows are up.
      facetsLoaded = true;
      fillFacets((await EC.api("GET", "/api/devices?limit=0&facets=true")).facets);
    }
  }

  function reload(delay = 0) {
    clearTimeout(reloadTimer);
    reloadTimer = setTimeout(() => load().catch((e) => console.error(e)), delay);
  }

  function changed(delay = 0) {
    query.offset = 0;
    reload(delay);
  }

  // The event stream carries the rows of this page only (and the counts).
  function watch() {
    if (!streamId) return;
    EC.api("POST", `/api/events/${encodeURIComponent(streamId)}/watch`, { devices: order }).catch((e) =>
      console.error(e),
    );
  }

  function fillFacets(facets) {
    for (const [id, values, label] of [
      ["model-filter", facets.models, "any model"],
      ["backend-filter", facets.backends, "any backend"],
    ]) {
      const sel = el(id);
      const keep = id === "model-filter" ? query.model : query.backend;
      const names = Object.keys(values);
      if (keep && !names.includes(keep)) names.push(keep);
      sel.innerHTML =
        `<option value="">${label}</option>` +
        names.map((n) => `<option value="${EC.esc(n)}">${EC.esc(n)} (${values[n] ?? 0})</option>`).join("");
      sel.value = keep;
    }
  }

  function stat(n, label, filterName, value, tone = "") {
    const cls = `stat${n && tone ? " " + tone : ""}`;
    return (
      `<a href="#" class="${cls}" data-filter="${filterName}" data-value="${EC.esc(value)}">` +
      `<b>${n.toLocaleString()}</b>${EC.esc(label)}</a>`
    );
  }

  function renderSummary() {
    const c = counts;
    el("summary").innerHTML = [
      stat(c.total || 0, "devices", "all", ""),
      stat(c.online || 0, "online", "state", "online"),
      stat(c.stale || 0, "stale", "state", "stale", "warn"),
      stat(c.offline || 0, c.silent ? `offline (${c.silent} silent)` : "offline", "state", "offline"),
      stat(c.failover || 0, "failed over", "failover", "true", "warn"),
      stat(c.pending || 0, "placements pending", "placement", "pending"),
      stat(c.refused || 0, "refused", "placement", "refused", "bad"),
      stat(c.failed || 0, "failed", "placement", "failed", "bad"),
    ].join("");
  }

  function rowHtml(r) {
    return (
      `<tr data-device="${EC.esc(r.device_id)}" class="${r.online ? "" : "is-offline"}">` +
      `<td><a href="/devices/${encodeURIComponent(r.device_id)}"` +
      `${r.broker ? ` title="on broker ${EC.esc(r.broker)}"` : ""}>${EC.esc(r.device_id)}</a></td>` +
      `<td>${stateCell(r)}</td>` +
      `<td class="age">${EC.esc(EC.age(r.last_seen))}</td>` +
      `<td class="tenants">${tenantChips(r)}</td>` +
      `<td class="num">${EC.num(r.fps)}</td>` +
      `<td class="num">${EC.num(r.p95_ms)}</td>` +
      `<td class="num">${r.queue_depth}</td>` +
      `<td class="num" title="${EC.esc(r.last_error || "")}">${r.errors}` +
      `${r.status_errors ? ` <span class="warn">+${r.status_errors}</span>` : ""}</td>` +
      `<td class="num">${r.drops}</td>` +
      `<td class="num">${placementCell(r)}</td></tr>`
    );
  }

  function render() {
    pending = false;
    const list = order.map((id) => rows.get(id)).filter(Boolean);
    body.innerHTML = list.length
      ? list.map(rowHtml).join("")
      : `<tr><td colspan="10" class="muted">${total ? "no device matches" : "no devices"}</td></tr>`;
    renderSummary();
    const first = list.length ? query.offset + 1 : 0;
    el("counts").textContent =
      `${first.toLocaleString()}–${(query.offset + list.length).toLocaleString()} of ` +
      `${matched.toLocaleString()}${matched === total ? "" : ` matched (${total.toLocaleString()} devices)`}`;
    el("page-prev").disabled = query.offset === 0;
    el("page-next").disabled = query.offset + list.length >= matched;
    el("ingest").textContent = stats.received
      ? `ingest ${stats.messages_per_s} msg/s, backlog ${stats.backlog}` +
        (stats.mqtt_broker ? `, broker ${stats.mqtt_broker}` : "")
      : "";
    for (const th of document.querySelectorAll("th[data-sort]")) {
      th.classList.toggle("sorted", th.dataset.sort === query.sort);
      th.classList.toggle("desc", th.dataset.sort === query.sort && query.desc);
    }
    document.body.dataset.rendered = String(list.length);
    if (!performance.getEntriesByName("fleet-rows").length) performance.mark("fleet-rows"); // first rows (bench)
  }

  function schedule() {
    if (!pending) {
      pending = true;
      requestAnimationFrame(render);
    }
  }

  function onFleet(ev) {
    for (const r of ev.devices) if (rows.has(r.device_id)) rows.set(r.device_id, r);
    const before = counts.total;
    counts = ev.counts || counts;
    stats = ev.stats || stats;
    // A device joined or left: the page's window moved (a quiet refetch, at most once a second).
    if (ev.removed.some((id) => rows.has(id)) || (before !== undefined && counts.total !== before)) reload(1000);
    schedule();
  }

  function syncControls() {
    filter.value = query.q;
    el("state-filter").value = query.state;
    el("placement-filter").value = query.placement;
    tagFilter.value = query.tag;
    el("failover-filter").checked = query.failover;
    el("page-size").value = String(query.limit);
  }

  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.addEventListener("click", () => {
      if (query.sort === th.dataset.sort) query.desc = !query.desc;
      else {
        query.sort = th.dataset.sort;
        query.desc = false;
      }
      changed();
    });
  }
  filter.addEventListener("input", () => {
    query.q = filter.value;
    changed(250);
  });
  tagFilter.addEventListener("input", () => {
    query.tag = tagFilter.value;
    changed(250);
  });
  el("state-filter").addEventListener("change", (ev) => {
    query.state = ev.target.value;
    changed();
  });
  el("placement-filter").addEventListener("change", (ev) => {
    query.placement = ev.target.value;
    changed();
  });
  el("model-filter").addEventListener("change", (ev) => {
    query.model = ev.target.value;
    changed();
  });
  el("backend-filter").addEventListener("change", (ev) => {
    query.backend = ev.target.value;
    changed();
  });
  el("failover-filter").addEventListener("change", (ev) => {
    query.failover = ev.target.checked;
    changed();
  });
  el("page-size").addEventListener("change", (ev) => {
    query.limit = Number(ev.target.value);
    changed();
  });
  el("page-prev").addEventListener("click", () => {
    query.offset = Math.max(0, query.offset - query.limit);
    reload();
  });
  el("page-next").addEventListener("click", () => {
    query.offset += query.limit;
    reload();
  });
  el("summary").addEventListener("click", (ev) => {
    const a = ev.target.closest("a[data-filter]");
    if (!a) return;
    ev.preventDefault();
    const { filter: name, value } = a.dataset;
    if (name === "all") {
      for (const f of FILTERS) query[f] = "";
      query.failover = false;
    } else if (name === "failover") query.failover = true;
    else query[name] = value;
    syncControls();
    if (name === "all") facetsLoaded = false;
    changed();
  });
  syncControls();

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
        selector: isSelector(query.q) ? query.q.trim() : "",
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

  EC.live(
    "/api/events?watch=true",
    {
      fleet: onFleet,
      hello: (data) => {
        streamId = data.stream;
        watch();
      },
    },
    () => load().catch((e) => console.error(e)),
  );
  // Ages ("3 s ago") drift even when nothing arrives; a page sorted by a live figure is refetched.
  setInterval(schedule, 5000);
  setInterval(() => {
    if (query.sort !== "device_id" && query.sort !== "online" && document.visibilityState === "visible") reload();
  }, 15000);
})();

// The pools page (docs/pools.md): each pool's members, their share of frames, the pool's throughput
// and latency, its scaling target and what the scaler did. Refreshed every second.
"use strict";

(() => {
  const root = document.getElementById("pools");

  function member(m) {
    const state = m.open ? (m.busy ? "busy" : "open") : "left the share";
    const share = m.share === null ? "–" : `${(m.share * 100).toFixed(0)}%`;
    const latency = m.latency_ms === null ? "–" : `${m.latency_ms} ms`;
    const objective = m.objective_share == null ? "–" : `${(m.objective_share * 100).toFixed(1)}%`;
    return (
      `<tr data-device="${EC.esc(m.device_id)}"><td><a href="/devices/${encodeURIComponent(m.device_id)}">` +
      `${EC.esc(m.device_id)}</a></td><td class="state">${EC.esc(state)}</td>` +
      `<td>${m.queued}/${m.depth}</td><td class="fps">${m.fps}</td><td class="share">${share}</td>` +
      `<td>${latency}</td><td class="objective">${objective}</td><td>${m.error_fps}</td><td>${m.left}</td></tr>`
    );
  }

  function pool(p) {
    const target = p.target
      ? `target: ${p.target.fps === null ? "what is sent" : EC.esc(p.target.fps) + " fps"}, ` +
        `${p.target.min_members}..${p.target.max_members} members, automatic scaling ${p.target.auto ? "on" : "off"}`
      : "no target: members are placed by hand";
    const decision = p.decision ? `scaler: ${EC.esc(p.decision.action)} (${EC.esc(p.decision.reason)})` : "";
    const actions = p.actions
      .map((a) => `<li>${EC.esc(EC.age(a.ts))}: ${EC.esc(a.action)} ${EC.esc(a.device_id || "")}: ${EC.esc(a.reason)}</li>`)
      .join("");
    return (
      `<section class="pool" data-pool="${EC.esc(p.pool)}" data-model="${EC.esc(p.model)}">` +
      `<h3>${EC.esc(p.pool)} <small>${EC.esc(p.model)}</small></h3>` +
      `<p class="figures">${p.members.length} member(s), <b class="pool-fps">${p.fps}</b> frames/s, ` +
      `mean latency ${p.latency_ms === null ? "–" : p.latency_ms + " ms"}, errors ${p.error_fps}/s, ` +
      (p.objective_share == null ? "" : `within objective ${(p.objective_share * 100).toFixed(1)}%, `) +
      `one member's measured capacity ${p.capacity_fps === null ? "not yet measured" : p.capacity_fps + " fps"}</p>` +
      `<p class="target">${target}</p><p class="decision">${decision}</p>` +
      '<table class="grid"><thead><tr><th>member</th><th>state</th><th>queue</th><th>frames/s</th>' +
      "<th>share</th><th>latency</th><th>within objective</th><th>errors/s</th><th>left share</th></tr></thead>" +
      `<tbody>${p.members.map(member).join("")}</tbody></table>` +
      (actions ? `<ul class="actions">${actions}</ul>` : "") +
      "</section>"
    );
  }

  async function load() {
    const pools = await EC.api("GET", "/api/pools");
    root.innerHTML = pools.length ? pools.map(pool).join("") : "<p>no pool has members yet</p>";
  }

  load();
  setInterval(load, 1000);
})();

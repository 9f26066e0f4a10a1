// The model store page (docs/fleet.md): upload a tar(.gz), list versions and where they are
// installed, deliver a version to a device, delete one.
"use strict";

(() => {
  const body = document.getElementById("models-body");
  const status = document.getElementById("models-status");
  const admin = document.querySelector('meta[name="role"]').content === "admin";
  const csrf = document.querySelector('meta[name="csrf-token"]').content;

  async function load() {
    const models = await EC.api("GET", "/api/models");
    if (!models.length) {
      body.innerHTML = '<tr><td colspan="8">no model versions uploaded yet</td></tr>';
      return;
    }
    body.innerHTML = models
      .map(
        (m) =>
          `<tr data-name="${EC.esc(m.name)}" data-version="${EC.esc(m.version)}">` +
          `<td>${EC.esc(m.name)}</td><td class="version">${EC.esc(m.version)}</td><td>${EC.esc(m.task)}</td>` +
          `<td>${(m.size / 1048576).toFixed(1)} MB</td><td>${EC.esc(EC.age(m.uploaded_at))}</td>` +
          `<td class="devices">${EC.esc(m.devices.join(", ") || "–")}</td>` +
          (admin
            ? '<td><input class="deliver-to" placeholder="device id" size="12">' +
              '<button type="button" class="link deliver">deliver</button></td>' +
              '<td><button type="button" class="link delete">delete</button></td>'
            : "") +
          "</tr>",
      )
      .join("");
  }

  const form = document.getElementById("model-form");
  if (form) {
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const message = document.getElementById("model-message");
      const file = document.getElementById("model-file").files[0];
      if (!file) return;
      message.textContent = `uploading ${file.name}…`;
      // The archive is the request body (not JSON): EC.api sends JSON only.
      const res = await fetch("/api/models", {
        method: "POST",
        headers: { "Content-Type": "application/octet-stream", "X-CSRF-Token": csrf, Accept: "application/json" },
        credentials: "same-origin",
        body: file,
      });
      const data = await res.json().catch(() => ({}));
      message.textContent = res.ok
        ? `uploaded ${data.name} ${data.version}`
        : `not accepted: ${data.detail || "HTTP " + res.status}`;
      await load();
    });
  }

  body.addEventListener("click", async (ev) => {
    const row = ev.target.closest("tr");
    if (!row) return;
    const { name, version } = row.dataset;
    try {
      if (ev.target.closest("button.delete")) {
        await EC.api("DELETE", `/api/models/${encodeURIComponent(name)}/${encodeURIComponent(version)}`);
        status.textContent = `deleted ${name} ${version}`;
        await load();
      } else if (ev.target.closest("button.deliver")) {
        const device = row.querySelector("input.deliver-to").value.trim();
        if (!device) return;
        await EC.api("POST", `/api/devices/${encodeURIComponent(device)}/models`, { model: name, version });
        status.textContent = `delivering ${name} ${version} to ${device}: its status shows the progress`;
      }
    } catch (err) {
      status.textContent = `refused: ${err.message}`;
    }
  });

  load().catch((err) => {
    status.textContent = `could not list models: ${err.message}`;
  });
})();

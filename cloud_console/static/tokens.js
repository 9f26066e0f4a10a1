// The API tokens page: list (with last use), create (the token is shown once), revoke.
"use strict";

(() => {
  const body = document.getElementById("tokens-body");
  const message = document.getElementById("token-message");

  async function load() {
    const tokens = await EC.api("GET", "/api/tokens");
    if (!tokens.length) {
      body.innerHTML = '<tr><td colspan="7">no tokens yet</td></tr>';
      return;
    }
    body.innerHTML = tokens
      .map(
        (t) =>
          `<tr data-id="${EC.esc(t.id)}"><td>${EC.esc(t.name)}</td><td>${EC.esc(t.user)}</td>` +
          `<td>${EC.esc(t.role)}</td><td>${EC.esc(EC.age(t.created))}</td>` +
          `<td class="last-used">${EC.esc(t.last_used ? EC.age(t.last_used) : "never")}</td>` +
          `<td class="state">${t.revoked ? "revoked " + EC.esc(EC.age(t.revoked)) : "active"}</td>` +
          `<td>${t.revoked ? "" : '<button type="button" class="link revoke">revoke</button>'}</td></tr>`,
      )
      .join("");
  }

  document.getElementById("token-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    message.textContent = "";
    try {
      const made = await EC.api("POST", "/api/tokens", {
        name: document.getElementById("token-name").value,
        role: document.getElementById("token-role").value,
      });
      document.getElementById("token-value").textContent = made.token;
      document.getElementById("token-new").hidden = false;
      document.getElementById("token-name").value = "";
      await load();
    } catch (err) {
      message.textContent = `not created: ${err.message}`;
    }
  });

  body.addEventListener("click", async (ev) => {
    const button = ev.target.closest("button.revoke");
    if (!button) return;
    const id = button.closest("tr").dataset.id;
    try {
      await EC.api("DELETE", `/api/tokens/${encodeURIComponent(id)}`);
      document.getElementById("token-new").hidden = true;
      await load();
    } catch (err) {
      message.textContent = `not revoked: ${err.message}`;
    }
  });

  load().catch((err) => {
    message.textContent = `could not list tokens: ${err.message}`;
  });
})();

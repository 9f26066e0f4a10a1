"""HTML pages: small server-rendered shells; the console's own scripts fill them from the JSON API.

No template engine and no inline script or style (the Content-Security-Policy allows only 'self'):
what a script needs (CSRF token, role, device id) travels in <meta> tags. Every value is escaped.
"""

from __future__ import annotations

from html import escape

ASSET_VERSION = "2"  # bump to make browsers refetch static files after an upgrade


def _page(
    title: str,
    body: str,
    *,
    meta: dict[str, str] | None = None,
    scripts: tuple[str, ...] = (),
    styles: tuple[str, ...] = (),
) -> str:
    links = "".join(
        f'<link rel="stylesheet" href="/static/{escape(s)}?v={ASSET_VERSION}">'
        for s in (*styles, "console.css")
    )
    metas = "".join(
        f'<meta name="{escape(k)}" content="{escape(v)}">' for k, v in sorted((meta or {}).items())
    )
    tags = "".join(f'<script src="/static/{escape(s)}?v={ASSET_VERSION}" defer></script>' for s in scripts)
    return (
        "<!doctype html>"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · edge console</title>"
        '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">'
        f"{links}{metas}{tags}</head><body>{body}</body></html>"
    )


def _signed_in(title: str, body: str, user: str, role: str, csrf: str, script: str) -> str:
    """A page for a logged-in user: who they are and the CSRF token travel in <meta> tags."""
    return _page(
        title, body, meta={"csrf-token": csrf, "role": role, "user": user}, scripts=("console.js", script)
    )


def _header(user: str, role: str, crumbs: str = "") -> str:
    return (
        '<header class="top"><a class="brand" href="/">edge console</a>'
        f'<nav class="crumbs">{crumbs}</nav>'
        f'<span class="who">signed in as <b id="who-user">{escape(user)}</b> '
        f'<span id="who-role" class="role role-{escape(role)}">{escape(role)}</span></span>'
        '<a href="/models" id="models-link" class="link">models</a>'
        '<a href="/pools" id="pools-link" class="link">pools</a>'
        '<a href="/rollouts" id="rollouts-link" class="link">rollouts</a>'
        '<a href="/tokens" id="tokens-link" class="link">API tokens</a>'
        '<button id="logout" type="button" class="link">log out</button>'
        '<span id="live" class="live" title="live updates">●</span></header>'
    )


def login(*, error: bool, next_url: str) -> str:
    message = '<p class="error" id="login-error">Wrong user name or password.</p>' if error else ""
    body = (
        '<main class="login"><h1>edge console</h1>'
        f"{message}"
        '<form method="post" action="/login" id="login-form">'
        f'<input type="hidden" name="next" value="{escape(next_url)}">'
        '<label>User <input name="username" id="username" autocomplete="username" required autofocus></label>'
        '<label>Password <input name="password" id="password" type="password" '
        'autocomplete="current-password" required></label>'
        '<button type="submit" id="login-submit">Log in</button></form></main>'
    )
    return _page("Log in", body)


def fleet(user: str, role: str, csrf: str) -> str:
    """The fleet table: one page of rows at a time, filtered and sorted by the server
    (GET /api/devices), with fleet-wide counts above it."""
    admin_only = "" if role == "admin" else " hidden"
    body = (
        _header(user, role) + '<main class="fleet">'
        '<section class="summary" id="summary" aria-live="polite"></section>'
        '<section class="bar">'
        '<input id="filter" type="search" '
        'placeholder="filter: device, model, backend, state, tag; or a selector site=north,hw=jetson" '
        'aria-label="filter">'
        '<select id="state-filter" aria-label="state filter"><option value="">any state</option>'
        '<option value="online">online</option><option value="stale">stale</option>'
        '<option value="offline">offline</option></select>'
        '<select id="model-filter" aria-label="model filter"><option value="">any model</option></select>'
        '<select id="backend-filter" aria-label="backend filter"><option value="">any backend</option>'
        "</select>"
        '<select id="placement-filter" aria-label="placement filter"><option value="">any placement</option>'
        + "".join(
            f"<option>{state}</option>" for state in ("pending", "applied", "failed", "refused", "none")
        )
        + "</select>"
        '<input id="tag-filter" placeholder="tag key:value" size="14" aria-label="tag filter">'
        '<label class="check"><input id="failover-filter" type="checkbox"> failed over</label>'
        '<span id="ingest" class="counts"></span>'
        "</section>"
        f'<details class="move" id="move-panel"{admin_only}><summary>Move a model across the fleet</summary>'
        '<form id="move-form" class="inline">'
        '<label>model <select id="move-model" required></select></label>'
        '<label>from backend <select id="move-from" required></select></label>'
        '<label>to backend <select id="move-to" required></select></label>'
        '<label>to device <input id="move-device" placeholder="first of the backend" size="10"></label>'
        '<button type="submit" id="move-submit">Move</button></form>'
        '<p id="move-result" class="result"></p></details>'
        '<table id="fleet" class="grid"><thead><tr>'
        '<th data-sort="device_id">device</th>'
        '<th data-sort="online">state</th>'
        '<th data-sort="last_seen">last seen</th>'
        "<th>tenants</th>"
        '<th data-sort="fps" class="num">fps</th>'
        '<th data-sort="p95_ms" class="num">p95 ms</th>'
        '<th data-sort="queue_depth" class="num">queue</th>'
        '<th data-sort="errors" class="num">errors</th>'
        '<th data-sort="drops" class="num">drops</th>'
        '<th data-sort="applied_generation" class="num">placement</th>'
        '</tr></thead><tbody id="fleet-body"><tr><td colspan="10">loading…</td></tr></tbody></table>'
        '<nav class="pager" id="pager"><button type="button" id="page-prev">‹ previous</button>'
        '<span id="counts" class="counts"></span>'
        '<button type="button" id="page-next">next ›</button>'
        '<select id="page-size" aria-label="rows per page"><option>50</option>'
        "<option selected>100</option><option>250</option><option>500</option></select></nav>"
        "</main>"
    )
    return _signed_in("Fleet", body, user, role, csrf, "fleet.js")


def device(device_id: str, user: str, role: str, csrf: str) -> str:
    crumbs = f'/ <span id="device-title">{escape(device_id)}</span>'
    readonly = (
        ""
        if role == "admin"
        else '<p class="note" id="readonly-note">Viewer: read-only. An admin can change placement.</p>'
    )
    body = (
        _header(user, role, crumbs) + '<main class="device">'
        '<section class="facts" id="facts"></section>'
        '<section class="charts"><h2>Live</h2>'
        '<div class="chart" id="chart-fps"><h3>throughput (fps)</h3></div>'
        '<div class="chart" id="chart-p95"><h3>latency p95 (ms)</h3></div>'
        '<div class="chart" id="chart-queue"><h3>queue depth</h3></div></section>'
        '<section><h2>Tenants</h2><table class="grid" id="tenants"><thead><tr>'
        "<th>model</th><th>backend</th><th>device</th><th>instances</th><th>state</th>"
        '<th class="num">fps</th><th class="num">p95 ms</th><th class="num" title="answers within the '
        'tenant\'s latency objective, last telemetry window">on time</th><th class="num">queue</th>'
        '<th class="num">drops</th><th class="num">errors</th><th>error</th></tr></thead>'
        '<tbody id="tenants-body"></tbody></table></section>'
        '<section><h2>Placement</h2><div id="placement-state" class="placement-state">–</div>'
        f"{readonly}"
        '<table class="grid editor" id="editor"><thead><tr><th>model</th><th>version</th><th>backend</th>'
        "<th>device</th>"
        "<th>instances</th><th>threads</th><th>batch max</th><th>batch delay ms</th><th></th></tr></thead>"
        '<tbody id="editor-body"></tbody></table>'
        '<div class="actions">'
        '<button type="button" id="add-tenant">Add tenant</button>'
        '<button type="button" id="apply-placement" class="primary">Apply placement</button>'
        '<button type="button" id="auto-place">Auto-place</button>'
        '<button type="button" id="reset-editor" class="link">reset</button></div>'
        '<p id="editor-message" class="result"></p></section>'
        '<section><h2>Capabilities</h2><div id="capabilities"></div></section>'
        '<section><h2>Errors reported by the device</h2><ul id="errors" class="errors"></ul></section>'
        '<section><h2>Placements published</h2><table class="grid" id="history"><thead><tr>'
        "<th>when</th><th>generation</th><th>by</th><th>action</th><th>tenants</th></tr></thead>"
        '<tbody id="history-body"></tbody></table></section>'
        "</main>"
    )
    return _page(
        device_id,
        body,
        meta={"csrf-token": csrf, "role": role, "user": user, "device-id": device_id},
        scripts=("vendor/uPlot.iife.min.js", "console.js", "device.js"),
        styles=("vendor/uPlot.min.css",),
    )


def tokens(user: str, role: str, csrf: str) -> str:
    """API tokens of this user (every user's for an admin): make one (shown once), revoke."""
    admin_option = '<option value="admin">admin</option>' if role == "admin" else ""
    body = (
        _header(user, role, "/ API tokens") + '<main class="tokens">'
        "<section><h2>New API token</h2>"
        '<p class="note">For scripts and CI: send it as <code>Authorization: Bearer &lt;token&gt;</code>. '
        "It acts for you, with at most your role, until revoked; it is shown once.</p>"
        '<form id="token-form" class="inline">'
        '<label>name <input id="token-name" required maxlength="64" placeholder="what it is for"></label>'
        f'<label>role <select id="token-role"><option value="viewer">viewer</option>{admin_option}'
        "</select></label>"
        '<button type="submit" id="token-create" class="primary">Create</button></form>'
        '<p id="token-new" class="result" hidden>New token (copy it now, it is not shown again): '
        '<code id="token-value"></code></p><p id="token-message" class="result"></p></section>'
        '<section><h2>Tokens</h2><table class="grid" id="tokens"><thead><tr>'
        "<th>name</th><th>user</th><th>role</th><th>created</th><th>last used</th><th>state</th><th></th>"
        '</tr></thead><tbody id="tokens-body"><tr><td colspan="7">loading…</td></tr></tbody></table>'
        "</section></main>"
    )
    return _signed_in("API tokens", body, user, role, csrf, "tokens.js")


def models(user: str, role: str, csrf: str) -> str:
    """The model store (docs/fleet.md): upload a version, deliver it to a device, delete it."""
    admin = role == "admin"
    upload = (
        "<section><h2>Upload a model version</h2>"
        '<p class="note">A tar or tar.gz of the model folder (<code>model.toml</code>, labels, artifacts). '
        "It is checked like <code>edge-agent models add</code> before it is kept.</p>"
        '<form id="model-form" class="inline">'
        '<label>archive <input id="model-file" type="file" required accept=".tar,.tgz,.tar.gz,.gz"></label>'
        '<button type="submit" id="model-upload" class="primary">Upload</button></form>'
        '<p id="model-message" class="result"></p></section>'
        if admin
        else ""
    )
    body = (
        _header(user, role, "/ models") + '<main class="models">' + upload + "<section><h2>Model store</h2>"
        '<table class="grid" id="models"><thead><tr>'
        "<th>model</th><th>version</th><th>task</th><th>size</th><th>uploaded</th><th>installed on</th>"
        f"{'<th>deliver to</th><th></th>' if admin else ''}"
        '</tr></thead><tbody id="models-body"><tr><td colspan="8">loading…</td></tr></tbody></table>'
        '<p id="models-status" class="result"></p></section></main>'
    )
    return _signed_in("Models", body, user, role, csrf, "models.js")


def not_found(device_id: str, user: str, role: str) -> str:
    body = _header(user, role) + (
        f'<main><p class="error">No device <b>{escape(device_id)}</b> has reported to this console.</p>'
        '<p><a href="/">back to the fleet</a></p></main>'
    )
    return _page("Not found", body, scripts=("console.js",))

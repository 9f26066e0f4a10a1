"""The console in real headless Chromium: log in, see the real agent, move its tenant in the editor,
see the agent apply it; a viewer cannot change anything; changes without the CSRF token are refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_console.simulator import FleetSimulator
from tests.test_console import ConsoleProcess, device_detail, wait_until

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
]
# Waits, not timing checks: a busy shared machine may take a while; the outcome is what is asserted.
expect.set_options(timeout=60_000)
FAST_TELEMETRY = "[metrics]\ntelemetry_interval_s = 0.5\n"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(60_000)
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    tab.on(
        "console",
        lambda msg: (
            problems.append(f"console: {msg.text}")
            if msg.type == "error" and "status of 40" not in msg.text  # 401/403 the tests provoke
            else None
        ),
    )
    yield tab
    context.close()
    assert problems == [], problems  # no script errors, no CSP violations


@pytest.fixture
def console(broker: Any, tmp_path: Path) -> Iterator[ConsoleProcess]:
    """Requested before `page`, so the page closes first and its event stream ends cleanly."""
    proc = ConsoleProcess(broker.url, tmp_path).start()
    yield proc
    assert proc.stop() == 0, proc.log()[-2000:]


def log_in(page: Any, console: ConsoleProcess, user: str, password: str) -> None:
    page.goto(console.base + "/")
    page.wait_for_url("**/login?next=/")
    page.fill("#username", user)
    page.fill("#password", password)
    page.click("#login-submit")
    page.wait_for_url(console.base + "/")
    expect(page.locator("#who-user")).to_have_text(user)


def test_admin_moves_the_real_agent_tenant_in_the_editor(agent_factory, collector, console, page):
    agent = agent_factory("edge1", FAST_TELEMETRY).start()
    agent.wait_ready()
    statuses = collector(["edge/edge1/status"])
    log_in(page, console, "admin", console.admin_password)
    row = page.locator('#fleet-body tr[data-device="edge1"]')
    expect(row.locator(".badge")).to_have_text("online")
    expect(row).to_contain_text("efficientnet-lite0 onnxruntime:cpu")
    expect(row).to_contain_text("ready")
    row.locator("a").click()
    page.wait_for_url("**/devices/edge1")
    expect(page.locator("#backends")).to_contain_text("openvino")
    expect(page.locator("#models")).to_contain_text("efficientnet-lite1")

    # The editor offers only what the agent reported it can run.
    tenant = page.locator('#editor-body tr[data-model="efficientnet-lite0"]')
    expect(tenant.locator("select.ed-backend")).to_have_value("onnxruntime")
    caps = device_detail(console.client("admin"), "edge1")["capabilities"]  # type: ignore[index]
    available = sorted(name for name, b in caps["backends"].items() if b["available"])
    assert sorted(tenant.locator("select.ed-backend option").all_inner_texts()) == available
    assert sorted(tenant.locator("select.ed-model option").all_inner_texts()) == sorted(caps["models"])
    tenant.locator("select.ed-backend").select_option("openvino")
    expect(tenant.locator("select.ed-device option")).to_have_text(caps["backends"]["openvino"]["devices"])
    tenant.locator("select.ed-device").select_option("CPU")
    page.click("#apply-placement")

    state = page.locator("#placement-state")
    expect(state).to_have_attribute("data-state", "applied", timeout=120_000)
    expect(state).to_contain_text("applied")
    generation = int(state.get_attribute("data-generation"))
    live = page.locator('#tenants-body tr[data-model="efficientnet-lite0"][data-backend="openvino"]')
    expect(live).to_contain_text("ready")
    expect(page.locator("#applied-generation")).to_have_text(str(generation))

    # The agent's own retained status says the same.
    def applied(msgs: list[dict[str, Any]]) -> bool:
        placement = (msgs[-1] if msgs else {}).get("placement") or {}
        return placement.get("applied_generation") == generation and any(
            t["model"] == "efficientnet-lite0"
            and (t["backend"], t["device"], t["state"]) == ("openvino", "CPU", "ready")
            for t in placement.get("tenants", [])
        )

    statuses.wait_for(applied, "edge/edge1/status", timeout=60)
    # Live charts (uPlot, served by the console) and the audit log.
    for chart in ("#chart-fps", "#chart-p95", "#chart-queue"):
        expect(page.locator(f"{chart} canvas")).to_have_count(1)
    expect(page.locator("#history-body")).to_contain_text("openvino:CPU")

    # Auto-place: published with backend "auto"; the agent measures the candidates and picks one.
    page.click("#auto-place")
    expect(state).to_have_attribute("data-generation", str(generation + 1))
    expect(state).to_have_attribute("data-state", "applied", timeout=120_000)

    def auto_applied(msgs: list[dict[str, Any]]) -> bool:
        placement = (msgs[-1] if msgs else {}).get("placement") or {}
        return placement.get("applied_generation") == generation + 1 and any(
            t["model"] == "efficientnet-lite0" and t["state"] == "ready" and t.get("auto")
            for t in placement.get("tenants", [])
        )

    placement = statuses.wait_for(auto_applied, "edge/edge1/status", timeout=60)[-1]["placement"]
    chosen = next(t for t in placement["tenants"] if t["model"] == "efficientnet-lite0" and t.get("auto"))
    assert (chosen["backend"], chosen["device"]) == (chosen["auto"]["backend"], chosen["auto"]["device"])
    assert f"{chosen['backend']}:{chosen['device']}" in chosen["auto"]["candidates"]

    # Back on the fleet page: the tenant where the agent placed it.
    page.click("a.brand")
    expect(row).to_contain_text(f"efficientnet-lite0 {chosen['backend']}:{chosen['device']}")
    expect(row).to_contain_text(f"{generation + 1} applied")


def test_viewer_cannot_change_placement(agent_factory, collector, console, page):
    agent = agent_factory("edge2", FAST_TELEMETRY).start()
    agent.wait_ready()
    statuses = collector(["edge/edge2/status"])
    log_in(page, console, "viewer", console.viewer_password)
    expect(page.locator("#move-panel")).to_be_hidden()
    page.locator('#fleet-body tr[data-device="edge2"] a').click()
    page.wait_for_url("**/devices/edge2")
    expect(page.locator("#readonly-note")).to_be_visible()
    tenant = page.locator('#editor-body tr[data-model="efficientnet-lite0"]')
    expect(tenant.locator("select.ed-backend")).to_be_disabled()
    expect(tenant.locator("input.ed-instances")).to_be_disabled()
    for button in ("#apply-placement", "#auto-place", "#add-tenant"):
        expect(page.locator(button)).to_be_hidden()

    # Even a request forged from the page, with the viewer's own valid CSRF token: 403.
    status, detail = page.evaluate(
        """async () => {
            const token = document.querySelector('meta[name="csrf-token"]').content;
            const r = await fetch('/api/devices/edge2/placement', {
                method: 'PUT',
                headers: {'Content-Type': 'application/json', 'X-CSRF-Token': token},
                body: JSON.stringify(
                    {tenants: [{model: 'efficientnet-lite0', backend: 'openvino', device: 'CPU'}]}),
            });
            return [r.status, (await r.json()).detail];
        }"""
    )
    assert status == 403 and "admin" in detail
    viewer = console.client("viewer")
    assert viewer.call("POST", "/api/devices/edge2/auto-place")[0] == 403
    # Nothing was published: the console holds no desired placement, the agent runs what it ran.
    assert device_detail(viewer, "edge2")["desired"] is None  # type: ignore[index]
    last = statuses.json("edge/edge2/status")[-1]
    assert last["placement"]["applied_generation"] == 0
    assert [t["backend"] for t in last["placement"]["tenants"]] == ["onnxruntime"]


def test_changes_without_the_csrf_token_are_refused(broker, console, page):
    sim = FleetSimulator(broker.host, broker.port, 2, interval_s=0.5, id_prefix="csrf").start()
    try:
        admin = console.client("admin")
        wait_until(lambda: device_detail(admin, "csrf-0000"), "the simulated device")
        log_in(page, console, "admin", console.admin_password)
        page.goto(console.base + "/devices/csrf-0000")
        expect(page.locator("#apply-placement")).to_be_visible()
        # A script on the page that leaves the token out: refused, although the cookie is sent.
        status, detail = page.evaluate(
            """async () => {
                const r = await fetch('/api/devices/csrf-0000/auto-place', {method: 'POST'});
                return [r.status, (await r.json()).detail];
            }"""
        )
        assert (status, detail) == (403, "CSRF token missing or invalid")
        # A classic cross-site form post from another site: no session cookie goes (SameSite=Strict),
        # and it would lack the token anyway.
        evil = (
            f'<form id="f" method="post" action="{console.base}/api/devices/csrf-0000/auto-place"></form>'
            '<script>document.getElementById("f").submit()</script>'
        )
        page.route("http://evil.test/**", lambda route: route.fulfill(body=evil, content_type="text/html"))
        page.goto("http://evil.test/")
        page.wait_for_url(f"{console.base}/api/devices/csrf-0000/auto-place")
        assert page.locator("body").inner_text() in (
            '{"detail":"log in first"}',
            '{"detail":"CSRF token missing or invalid"}',
        )
        assert device_detail(admin, "csrf-0000")["desired"] is None  # type: ignore[index]
        # The same change with the token goes through.
        page.goto(console.base + "/devices/csrf-0000")
        page.click("#auto-place")
        expect(page.locator("#placement-state")).to_have_attribute("data-state", "refused")
    finally:
        sim.stop()

"""The paged fleet page (docs/console.md#pages) against 230 simulated devices and the real console:
in headless Chromium it shows one page of rows with the fleet-wide counts, pages, sorts and filters
through the server, and keeps the rows on screen live; the event stream behind it carries only the
rows the page shows."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.devtools.local_broker import LocalBroker
from cloud_console.simulator import FleetSimulator
from tests.test_console import Client, ConsoleProcess, wait_until

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
DEVICES = 230
pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
]
expect.set_options(timeout=60_000)  # waits for an outcome, not timing checks


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ConsoleProcess, FleetSimulator]]:
    with LocalBroker() as broker:
        sim = FleetSimulator(broker.host, broker.port, DEVICES, interval_s=2.0, per_connection=50)
        sim.start()
        console = ConsoleProcess(broker.url, tmp_path_factory.mktemp("console")).start()
        try:
            admin = console.client("admin")
            wait_until(lambda: admin.get("/api/devices?limit=0")["counts"]["online"] == DEVICES, "the fleet")
            yield console, sim
        finally:
            console.stop()
            sim.stop()


def fleet_events(client: Client, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) from the console's event stream, as a browser's EventSource reads it."""
    req = urllib.request.Request(client.base + path, headers={"Accept": "text/event-stream"})
    with client.opener.open(req, timeout=60) as res:
        event = ""
        for raw in res:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                yield event, json.loads(line[6:])


def test_a_watching_stream_carries_only_the_rows_it_shows(fleet):
    console, _ = fleet
    viewer = console.client("viewer")
    shown = {"sim-0001", "sim-0002"}
    seen: set[str] = set()
    stream = fleet_events(viewer, "/api/events?watch=true")
    event, hello = next(stream)
    assert event == "hello"
    status, data = viewer.call("POST", f"/api/events/{hello['stream']}/watch", {"devices": sorted(shown)})
    assert (status, data) == (200, {"watching": 2})
    for event, data in stream:  # every device sends telemetry every 2 s: events come each second
        if event != "fleet":
            continue
        assert data["counts"]["total"] == DEVICES
        seen |= {r["device_id"] for r in data["devices"]}
        assert seen <= shown, seen
        if seen == shown:
            break
    # Another user cannot steer this stream; a stream that does not exist is a 404.
    other = console.client("admin")
    assert other.call("POST", f"/api/events/{hello['stream']}/watch", {"devices": []})[0] == 404
    assert viewer.call("POST", "/api/events/nope/watch", {"devices": []})[0] == 404


def test_the_api_pages_and_refuses_a_bad_query(fleet):
    console, _ = fleet
    viewer = console.client("viewer")
    page = viewer.get("/api/devices?limit=50&offset=200")
    assert [r["device_id"] for r in page["devices"]] == [f"sim-{i:04d}" for i in range(200, 230)]
    assert (page["matched"], page["total"]) == (DEVICES, DEVICES)
    coral = viewer.get("/api/devices?backend=edgetpu&limit=1000")
    assert coral["matched"] == len(coral["devices"]) > 0
    assert all(any(t["backend"] == "edgetpu" for t in r["tenants"]) for r in coral["devices"])
    status, data = viewer.call("GET", "/api/devices?sort=password")
    assert status == 422 and "sort" in str(data)


def test_the_fleet_page_shows_one_page_and_pages_sorts_and_filters_on_the_server(fleet):
    console, _ = fleet
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            page.goto(console.base + "/login?next=/")
            page.fill("#username", "admin")
            page.fill("#password", console.admin_password)
            page.click("#login-submit")
            rows = page.locator("#fleet-body tr[data-device]")
            expect(rows).to_have_count(100)
            expect(rows.first).to_have_attribute("data-device", "sim-0000")
            expect(page.locator("#summary")).to_contain_text(f"{DEVICES}devices")
            expect(page.locator("#counts")).to_have_text(f"1–100 of {DEVICES}")

            page.click("#page-next")
            expect(rows.first).to_have_attribute("data-device", "sim-0100")
            expect(page.locator("#counts")).to_have_text(f"101–200 of {DEVICES}")

            page.click("th[data-sort='device_id']")  # descending, back to the first page
            expect(rows.first).to_have_attribute("data-device", f"sim-{DEVICES - 1:04d}")
            assert "desc=true" in page.url

            page.select_option("#backend-filter", "edgetpu")
            expect(page.locator("#counts")).to_contain_text(f"matched ({DEVICES} devices)")
            for chips in rows.locator("td.tenants").all_text_contents():
                assert "edgetpu" in chips
            page.fill("#filter", "sim-0222")
            expect(rows).to_have_count(1)
            expect(rows.first).to_have_attribute("data-device", "sim-0222")

            # A change on a device on screen arrives live (no reload): its placement cell.
            admin = console.client("admin")
            body = {"tenants": [{"model": "efficientnet-lite0", "backend": "edgetpu", "device": "usb:0"}]}
            status, data = admin.call("PUT", "/api/devices/sim-0222/placement", body)
            assert status == 200, data
            expect(rows.first.locator("td").last).to_contain_text("applied")
            # The URL keeps the view: a reload shows the same filtered page.
            page.reload()
            expect(rows).to_have_count(1)
            expect(page.locator("#backend-filter")).to_have_value("edgetpu")
            assert problems == [], problems
        finally:
            browser.close()

"""The rollouts page in real headless Chromium (docs/fleet.md#rollouts): a selector filters the fleet
table; an admin starts a rollout with the form, approves its second wave, sees each device succeed with its gate figures, then rolls
it back from the page and sees every device restored."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.rollout import tar_gz, tiny_model
from cloud_console.simulator import FleetSimulator
from tests.test_console import wait_until
from tests.test_console_browser import CHROMIUM, browser, console, expect, log_in, page  # noqa: F401
from tests.test_delivery import raw

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
]


@pytest.fixture
def sim(broker: Any) -> Iterator[FleetSimulator]:
    fleet = FleetSimulator(broker.host, broker.port, 3, interval_s=0.3, id_prefix="web").start()
    yield fleet
    fleet.stop()


def lite0_versions(admin: Any, device_id: str) -> list[str | None]:
    status = admin.get(f"/api/devices/{device_id}")["status"]
    return [t.get("version") for t in status["placement"]["tenants"] if t["model"] == "efficientnet-lite0"]


def test_start_approve_and_roll_back_from_the_rollouts_page(console, sim, page, tmp_path):  # noqa: F811
    admin = console.client("admin")
    token = admin.call("POST", "/api/tokens", {"name": "web"})[1]["token"]
    assert raw(console.base, "POST", "/api/models", tar_gz(tiny_model(tmp_path, "2.0.0")), token)[0] == 201
    wait_until(lambda: admin.get("/api/devices")["stats"]["online"] == 3, "the simulated devices")
    log_in(page, console, "admin", console.admin_password)
    page.fill("#filter", "hw=jetson")  # a selector in the fleet filter: web-0001 is the Jetson
    expect(page.locator("#fleet-body tr")).to_have_count(1)
    expect(page.locator("#fleet-body tr")).to_contain_text("web-0001")
    page.fill("#filter", "web")
    expect(page.locator("#fleet-body tr")).to_have_count(3)
    page.click("#rollouts-link")
    page.wait_for_url(console.base + "/rollouts")
    expect(page.locator("#rollouts-body")).to_contain_text("no rollouts yet")

    page.click("#create-panel summary")
    page.fill("#ro-selector", "id=web-*")
    page.fill("#ro-model", "efficientnet-lite0")
    page.fill("#ro-version", "2.0.0")
    page.fill("#ro-waves", "1,all")
    page.fill("#ro-soak", "1")
    page.check("#ro-manual")
    page.click("#ro-submit")
    expect(page.locator("#create-result")).to_contain_text("3 devices in 2 waves")
    expect(page.locator("#ro-state-text")).to_have_text("waiting approval", timeout=60_000)
    canary = page.locator("#wave-1 tr[data-device]")
    expect(canary.locator(".dev-state")).to_have_text("succeeded")
    expect(canary).to_contain_text(re.compile(r"errors \d+\.\d% · p95 [\d.]+ ms \([\d.]+×\) · fps"))
    expect(page.locator("#ro-timeline")).to_contain_text("wave 2 waits for approval")

    page.click("#ro-approve")
    expect(page.locator("#ro-state-text")).to_have_text("completed", timeout=60_000)
    expect(page.locator("#rollouts-body .ro-state")).to_have_text("completed")
    for device_id in ("web-0000", "web-0001", "web-0002"):
        assert lite0_versions(admin, device_id) == ["2.0.0"]

    page.click("#ro-rollback")
    expect(page.locator("#ro-state-text")).to_have_text("rolled back", timeout=60_000)
    expect(page.locator("#ro-reason")).to_have_text("rolled back by admin")
    expect(page.locator("#wave-2 .dev-state").first).to_have_text("rolled back")
    for device_id in ("web-0000", "web-0001", "web-0002"):
        assert lite0_versions(admin, device_id) == ["1.0.0"]

"""The console's models page in real headless Chromium (docs/fleet.md): an admin uploads a version
with the form, a broken archive is refused with the reason, and a version is delivered to a real
agent from the page and then shown installed there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_console import device_detail, wait_until
from tests.test_console_browser import CHROMIUM, browser, console, expect, log_in  # noqa: F401
from tests.test_delivery import NAME, new_version, raw, tar_of

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
]


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:  # noqa: F811
    """A tab that fails the test on script errors, except the 422 the refused upload provokes."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(60_000)
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    tab.on(
        "console",
        lambda msg: (
            problems.append(f"console: {msg.text}")
            if msg.type == "error" and "status of 422" not in msg.text
            else None
        ),
    )
    yield tab
    context.close()
    assert problems == [], problems


def test_upload_and_deliver_from_the_models_page(agent_factory, console, page, tmp_path):  # noqa: F811
    admin = console.client("admin")
    token = admin.call("POST", "/api/tokens", {"name": "edge-web", "role": "viewer"})[1]["token"]
    agent = agent_factory("edge-web", f'[models]\nconsole_url = "{console.base}"\ntoken = "{token}"\n')
    agent.start().wait_ready()
    log_in(page, console, "admin", console.admin_password)
    page.click("#models-link")
    page.wait_for_url(console.base + "/models")
    expect(page.locator("#models-body")).to_contain_text("no model versions uploaded yet")

    broken = tmp_path / "broken.tar.gz"
    folder = new_version(tmp_path, "2.0.1", "x ")
    (folder / "labels.txt").unlink()
    broken.write_bytes(tar_of(folder))
    page.set_input_files("#model-file", str(broken))
    page.click("#model-upload")
    expect(page.locator("#model-message")).to_contain_text(
        "not accepted: labels file 'labels.txt' is missing"
    )

    good = tmp_path / "good.tar.gz"
    good.write_bytes(tar_of(new_version(tmp_path, "2.0.0", "v2 ")))
    page.set_input_files("#model-file", str(good))
    page.click("#model-upload")
    expect(page.locator("#model-message")).to_have_text(f"uploaded {NAME} 2.0.0")
    row = page.locator(f'tr[data-name="{NAME}"][data-version="2.0.0"]')
    expect(row.locator(".devices")).to_have_text("–")

    row.locator("input.deliver-to").fill("edge-web")
    row.locator("button.deliver").click()
    expect(page.locator("#models-status")).to_contain_text("delivering")

    def installed() -> Any:
        return [e for e in admin.get("/api/models") if e["devices"] == ["edge-web"]]

    wait_until(installed, "the console to see 2.0.0 installed on edge-web", timeout=120)
    page.reload()
    expect(page.locator(f'tr[data-name="{NAME}"][data-version="2.0.0"] .devices')).to_have_text("edge-web")
    # The device page shows the versions it has and how the delivery went.
    page.goto(console.base + "/devices/edge-web")
    expect(page.locator("#versions")).to_contain_text(f"{NAME} 2.0.0, 1.0.0")
    expect(page.locator("#deliveries")).to_contain_text(f"{NAME} 2.0.0: installed")

    # The placement editor pins a version the device lacks: the console delivers it, then places it.
    newer = tmp_path / "newer.tar.gz"
    newer.write_bytes(tar_of(new_version(tmp_path, "2.1.0", "v21 ")))
    admin_token = admin.call("POST", "/api/tokens", {"name": "ops", "role": "admin"})[1]["token"]
    status, entry = raw(console.base, "POST", "/api/models", newer.read_bytes(), admin_token)
    assert status == 201, entry
    page.locator(f'#editor-body tr[data-model="{NAME}"] .ed-version').fill("2.1.0")
    page.click("#apply-placement")
    expect(page.locator("#editor-message")).to_contain_text("published generation")
    expect(page.locator("#versions")).to_contain_text(f"{NAME} 2.1.0, 2.0.0, 1.0.0")

    def serving_new() -> bool:
        tenants = device_detail(admin, "edge-web")["status"]["placement"]["tenants"]
        return [(t.get("version"), t["state"]) for t in tenants] == [("2.1.0", "ready")]

    wait_until(serving_new, "edge-web serving 2.1.0 alone")

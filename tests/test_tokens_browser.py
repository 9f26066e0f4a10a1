"""API tokens in the console page, in real headless Chromium: made (shown once), used by a script
with no cookie and no CSRF token, listed with its last use, revoked (the script is then refused)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_console import Client, ConsoleProcess
from tests.test_console_browser import browser, console, expect, log_in, page  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(240)


def test_a_token_made_in_the_page_works_for_a_script_until_revoked(console: ConsoleProcess, page: Any):  # noqa: F811
    log_in(page, console, "viewer", console.viewer_password)
    page.click("#tokens-link")
    page.wait_for_url("**/tokens")
    expect(page.locator("#tokens-body")).to_contain_text("no tokens yet")
    expect(page.locator("#token-role option")).to_have_count(1)  # a viewer makes viewer tokens only
    page.fill("#token-name", "wall display")
    page.click("#token-create")
    expect(page.locator("#token-new")).to_be_visible()
    token = page.locator("#token-value").inner_text()
    assert token.startswith("ect_")
    row = page.locator("#tokens-body tr", has_text="wall display")
    expect(row.locator(".last-used")).to_have_text("never")

    script = Client(console.base)
    header = {"Authorization": f"Bearer {token}"}
    assert script.call("GET", "/api/devices", headers=header)[0] == 200
    page.reload()
    expect(row.locator(".last-used")).not_to_have_text("never")
    expect(page.locator("#token-new")).to_be_hidden()  # shown once: not after a reload
    assert token not in page.content()

    row.locator("button.revoke").click()
    expect(row.locator(".state")).to_contain_text("revoked")
    assert script.call("GET", "/api/devices", headers=header)[0] == 401

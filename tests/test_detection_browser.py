"""The console's device page shows the last detections of a detection tenant (real agent, real
Mosquitto, real console, headless Chromium)."""

from __future__ import annotations

from tests.conftest import sample
from tests.test_console_browser import browser, console, expect, log_in, page, pytestmark  # noqa: F401

DETECTOR_AND_CLASSIFIER = (
    "[metrics]\ntelemetry_interval_s = 0.5\n"
    '[placement]\ngeneration = 0\n[[placement.tenants]]\nmodel = "efficientnet-lite0"\n'
    '[[placement.tenants]]\nmodel = "mb3-centernet"\n'
)


def test_device_page_shows_the_last_detections(agent_factory, collector, console, page):  # noqa: F811
    agent = agent_factory("cam-det", DETECTOR_AND_CLASSIFIER).start()
    agent.wait_ready()
    log_in(page, console, "admin", console.admin_password)
    page.goto(console.base + "/devices/cam-det")
    results = collector(["edge/cam-det/result"])
    results.publish("edge/cam-det/infer/mb3-centernet", sample("detection/person.jpg"))
    results.wait_for(lambda m: len(m) >= 1, "edge/cam-det/result", 60)
    shown = page.locator('#detections [data-model="mb3-centernet"]')
    expect(shown).to_contain_text("person")
    expect(shown).to_contain_text("dog")
    # The classifier is no detection tenant: it gets no line there.
    expect(page.locator('#detections [data-model="efficientnet-lite0"]')).to_have_count(0)

"""The console's device page shows a cascade's classes beside the last detections (real agent, real
Mosquitto, real console, headless Chromium; docs/detection.md "Cascades")."""

from __future__ import annotations

from tests.conftest import sample
from tests.test_console_browser import browser, console, expect, log_in, page, pytestmark  # noqa: F401

CASCADE = (
    "[metrics]\ntelemetry_interval_s = 0.5\n"
    '[placement]\ngeneration = 0\n[[placement.tenants]]\nmodel = "mb3-centernet"\n'
    '[[placement.tenants]]\nmodel = "efficientnet-lite0"\n'
    'cascade = { after = "mb3-centernet", labels = ["dog"], min_box_px = 40 }\n'
)


def test_device_page_shows_the_breed_of_the_dog(agent_factory, collector, console, page):  # noqa: F811
    agent = agent_factory("cam-casc", CASCADE).start()
    agent.wait_ready()
    log_in(page, console, "admin", console.admin_password)
    page.goto(console.base + "/devices/cam-casc")
    results = collector(["edge/cam-casc/result"])
    results.publish("edge/cam-casc/infer/mb3-centernet", sample("detection/person.jpg"))
    answer = results.wait_for(lambda m: len(m) >= 1, "edge/cam-casc/result", 60)[0]
    dog = next(d for d in answer["detections"] if d["label"] == "dog")
    breed = dog["classes"][0]["label"]
    shown = page.locator('#detections [data-model="mb3-centernet"]')
    expect(shown).to_contain_text(f"dog {dog['score']:.2f} → {breed}")
    expect(shown).to_contain_text("person")

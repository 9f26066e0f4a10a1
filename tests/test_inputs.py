"""`[[inputs]]`: frames on other topics (Frigate's snapshot topics here) served by the model named in
the config, answered on the result topic with the topic they came from."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from agent.devtools.local_broker import LocalBroker
from agent.service.config import AgentConfig, ConfigError, load_config
from tests.conftest import CAT_CLASSES, ESPRESSO, AgentProcess, Collector, sample

INPUTS = """
[[inputs]]
topic = "frigate/+/person/snapshot"
model = "efficientnet-lite0"

[[inputs]]
topic = "kitchen/cam/#"
model = "efficientnet-lite0"
qos = 0
"""


def test_frames_on_input_topics_are_answered_naming_their_topic(
    agent_factory: Callable[..., AgentProcess], broker: LocalBroker
) -> None:
    agent = agent_factory("in1", config=INPUTS).start()
    agent.wait_ready()
    c = Collector(broker.port, ["edge/in1/result"])
    c.publish("frigate/front_door/person/snapshot", sample("cat.jpg"))
    c.publish("kitchen/cam/left/latest", sample("espresso.jpg"))
    c.publish("frigate/front_door/person/snapshot", b"not an image")  # answered too, as an error
    c.publish("frigate/front_door/car/snapshot", sample("cat.jpg"))  # no filter takes it
    results = c.wait_for(lambda r: len(r) >= 3, "edge/in1/result")
    by_topic = {r["source_topic"]: r for r in results if "top" in r}
    assert by_topic["frigate/front_door/person/snapshot"]["top"][0]["index"] in CAT_CLASSES
    assert by_topic["kitchen/cam/left/latest"]["top"][0]["index"] == ESPRESSO
    assert all(r["model"] == "efficientnet-lite0" for r in results)
    (error,) = [r for r in results if "error" in r]
    assert (
        error["error"]["code"] == "bad_image"
        and error["source_topic"] == "frigate/front_door/person/snapshot"
    )
    # A frame on the agent's own topic is answered without a source topic, as before.
    c.publish("edge/in1/infer", sample("cat.jpg"))
    results = c.wait_for(lambda r: len(r) >= 4, "edge/in1/result")
    assert "source_topic" not in results[-1]
    assert not any(r.get("source_topic") == "frigate/front_door/car/snapshot" for r in results)
    c.close()


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("edge/in2/infer", "overlap the agent's own topics"),
        ("edge/+/result", "overlap the agent's own topics"),
        ("edge/+/ha/#", "overlap the agent's own topics"),  # its Home Assistant states
        ("homeassistant/#", "overlap the agent's own topics"),  # HA's discovery configs
        ("#", "too wide"),
        ("cam/fo+o", "not a valid MQTT topic filter"),
        ("cam/#/x", "not a valid MQTT topic filter"),
    ],
)
def test_input_filters_that_cannot_work_are_config_errors(tmp_path: object, topic: str, why: str) -> None:
    path = tmp_path / "agent.toml"  # type: ignore[operator]
    path.write_text(f'device_id = "in2"\n[[inputs]]\ntopic = "{topic}"\nmodel = "efficientnet-lite0"\n')
    with pytest.raises(ConfigError, match=why):
        load_config(path)


def test_input_model_name_is_checked() -> None:
    with pytest.raises(ValueError, match="not a valid model name"):
        AgentConfig(device_id="in3", inputs=[{"topic": "cams/x", "model": "../../etc"}])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("first", "second", "overlap"),
    [
        ("frigate/+/person/snapshot", "frigate/front/+/snapshot", True),
        ("cams/#", "cams", True),  # '#' matches its parent level too
        ("cams/+/jpeg", "cams/front/jpeg", True),
        ("frigate/front/person/snapshot", "frigate/back/#", False),
        ("cams/+", "cams/a/b", False),
    ],
)
def test_overlapping_input_filters_are_refused(
    tmp_path: object, first: str, second: str, overlap: bool
) -> None:
    """A frame on a topic two filters match would be delivered, and served, once per filter."""
    path = tmp_path / "agent.toml"  # type: ignore[operator]
    path.write_text(
        'device_id = "in3"\n'
        f'[[inputs]]\ntopic = "{first}"\nmodel = "efficientnet-lite0"\n'
        f'[[inputs]]\ntopic = "{second}"\nmodel = "efficientnet-lite1"\n'
    )
    if overlap:
        with pytest.raises(ConfigError, match="overlaps"):
            load_config(path)
    else:
        assert [i.topic for i in load_config(path).inputs] == [first, second]

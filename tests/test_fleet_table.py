"""The fleet table served a page at a time (cloud_console/fleet.py), the live rows a page watches
(cloud_console/events.py), convergence and silence rules (cloud_console/service.py), and the agent's
broker nodes (agent.protocol.connection.Nodes, broker.nodes). Pure and in-process: no broker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.connection import Nodes
from agent.protocol.editing import DesiredPlacement
from agent.protocol.schemas import (
    Candidate,
    DeviceTelemetry,
    PlacementStatus,
    Refusal,
    Status,
    Telemetry,
    TenantSpec,
    TenantStatus,
    TenantTelemetry,
)
from agent.service.config import ConfigError, load_config
from cloud_console.config import ConsoleConfig, StorageSettings
from cloud_console.events import Hub
from cloud_console.fleet import BadQuery, Device, Fleet, FleetQuery
from cloud_console.service import Console

NOW = 1_800_000_000.0


def tenant(model: str, backend: str, state: str = "ready", **extra: Any) -> TenantStatus:
    return TenantStatus(model=model, backend=backend, device="cpu", state=state, **extra)  # type: ignore[arg-type]


def add(
    fleet: Fleet,
    device_id: str,
    tenants: list[TenantStatus],
    *,
    online: bool = True,
    seen_ago: float = 1.0,
    generation: int = 1,
    tags: dict[str, str] | None = None,
) -> Device:
    device = fleet.get_or_add(device_id, NOW - 100)
    placement = PlacementStatus(generation=generation, applied_generation=generation, tenants=tenants)
    device.status = Status(online=online, device_id=device_id, placement=placement, ts=NOW)
    device.placement = placement
    device.last_seen = NOW - seen_ago
    if tags is not None:
        device.console_tags = tags  # type: ignore[attr-defined]  # tags the console assigned
    device.touch()
    return device


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    """25 devices: 0-9 lite0 on onnxruntime, 10-19 lite1 on openvino, 20-24 both; a few offline,
    stale, failed over, tagged."""
    fleet = Fleet(stale_after_s=30.0)
    for i in range(25):
        if i < 10:
            tenants = [tenant("efficientnet-lite0", "onnxruntime")]
        elif i < 20:
            tenants = [tenant("efficientnet-lite1", "openvino")]
        else:
            tenants = [tenant("efficientnet-lite0", "onnxruntime"), tenant("efficientnet-lite1", "openvino")]
        add(
            fleet,
            f"dev-{i:02d}",
            tenants,
            online=i not in (3, 13),
            seen_ago=120.0 if i in (4, 14) else float(i),
            tags={"site": "north" if i % 2 else "south", **({"rack": "r1"} if i < 5 else {})},
        )
    # dev-21 serves its lite1 tenant on its second candidate: failed over.
    failed_over = tenant(
        "efficientnet-lite1",
        "onnxruntime",
        candidates=[Candidate(backend="openvino", device="CPU"), Candidate(backend="onnxruntime")],
        serving=Candidate(backend="onnxruntime"),
    )
    add(fleet, "dev-21", [tenant("efficientnet-lite0", "onnxruntime"), failed_over], seen_ago=21.0)
    return fleet


def ids(page: dict[str, Any]) -> list[str]:
    return [r["device_id"] for r in page["devices"]]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (FleetQuery(limit=5), ["dev-00", "dev-01", "dev-02", "dev-03", "dev-04"]),
        (FleetQuery(limit=3, offset=22), ["dev-22", "dev-23", "dev-24"]),
        (FleetQuery(limit=5, offset=24), ["dev-24"]),
        (FleetQuery(limit=5, offset=30), []),
        (FleetQuery(limit=3, desc=True), ["dev-24", "dev-23", "dev-22"]),
        (FleetQuery(limit=2, sort="last_seen", desc=True), ["dev-00", "dev-01"]),
        (FleetQuery(limit=3, sort="last_seen"), ["dev-04", "dev-14", "dev-24"]),
        (FleetQuery(q="DEV-1", limit=3), ["dev-10", "dev-11", "dev-12"]),
        (FleetQuery(q="openvino", limit=100), [f"dev-{i}" for i in range(10, 25) if i != 21]),
        (
            FleetQuery(device_id="2", limit=100),
            ["dev-02", "dev-12", "dev-20", "dev-21", "dev-22", "dev-23", "dev-24"],
        ),
        (FleetQuery(state="offline"), ["dev-03", "dev-13"]),
        (FleetQuery(state="stale"), ["dev-04", "dev-14"]),
        (FleetQuery(online=False), ["dev-03", "dev-13"]),
        (
            FleetQuery(model="efficientnet-lite0", backend="openvino"),
            ["dev-20", "dev-22", "dev-23", "dev-24"],
        ),
        (FleetQuery(backend="tflite"), []),
        (FleetQuery(failover=True), ["dev-21"]),
        (FleetQuery(tag="rack:r1"), ["dev-00", "dev-01", "dev-02", "dev-03", "dev-04"]),
        (FleetQuery(tag="rack"), ["dev-00", "dev-01", "dev-02", "dev-03", "dev-04"]),
        (FleetQuery(tag="site:north", state="offline"), ["dev-03", "dev-13"]),
        (FleetQuery(tag="site:east"), []),
        (FleetQuery(q="site:south", limit=3), ["dev-00", "dev-02", "dev-04"]),
        (FleetQuery(placement="none", limit=2), ["dev-00", "dev-01"]),
        (FleetQuery(placement="pending"), []),
    ],
)
def test_a_page_is_filtered_sorted_and_windowed_on_the_server(fleet: Fleet, query: FleetQuery, expected):
    page = fleet.page(query, NOW)
    assert ids(page) == expected
    assert page["total"] == 25


def test_matched_counts_every_row_that_passes_not_just_the_page(fleet):
    page = fleet.page(FleetQuery(q="openvino", limit=4, offset=4), NOW)
    assert page["matched"] == 14 and len(page["devices"]) == 4
    # The partial sort (first pages) and the full sort (later ones) agree on the order.
    everything = ids(fleet.page(FleetQuery(sort="fps", limit=1000), NOW))
    stitched = [
        d
        for offset in range(0, 25, 4)
        for d in ids(fleet.page(FleetQuery(sort="fps", offset=offset, limit=4), NOW))
    ]
    assert stitched == everything


def test_counts_are_fleet_wide_whatever_the_filter(fleet):
    counts = fleet.page(FleetQuery(q="dev-00", limit=1), NOW)["counts"]
    assert counts == {
        "total": 25,
        "online": 21,
        "stale": 2,
        "offline": 2,
        "silent": 0,
        "failover": 1,
        "pending": 0,
        "refused": 0,
        "failed": 0,
    }


def test_rows_say_stale_as_of_now_and_carry_tags(fleet):
    rows = {r["device_id"]: r for r in fleet.page(FleetQuery(device_id="dev-0", limit=10), NOW)["devices"]}
    assert rows["dev-04"]["stale"] and not rows["dev-05"]["stale"]
    assert rows["dev-01"]["tags"] == {"site": "north", "rack": "r1"}
    facets = fleet.page(FleetQuery(limit=0, facets=True), NOW)["facets"]
    assert facets["models"] == {"efficientnet-lite0": 15, "efficientnet-lite1": 15}
    assert facets["backends"]["openvino"] == 14


def test_a_changed_device_is_filtered_by_what_it_sent_last(fleet):
    fresh = Fleet(30.0)
    device = add(fresh, "dev-x", [tenant("efficientnet-lite0", "onnxruntime")])
    assert ids(fresh.page(FleetQuery(backend="onnxruntime"), NOW)) == ["dev-x"]
    add(fresh, "dev-x", [tenant("efficientnet-lite0", "openvino")])
    assert device is fresh.devices["dev-x"]
    assert ids(fresh.page(FleetQuery(backend="onnxruntime"), NOW)) == []
    assert ids(fresh.page(FleetQuery(backend="openvino"), NOW)) == ["dev-x"]


def test_telemetry_moves_a_device_in_a_sort_by_throughput_and_the_default_page_follows_joins():
    fresh = Fleet(30.0)
    for name in ("b", "a", "c"):
        add(fresh, name, [tenant("efficientnet-lite0", "onnxruntime")])
    by_fps = FleetQuery(sort="fps", desc=True, limit=1)
    assert ids(fresh.page(by_fps, NOW)) == ["c"]  # all at 0 fps: the id decides
    device = fresh.devices["a"]
    device.telemetry = Telemetry(
        device_id="a",
        interval_s=5.0,
        device=DeviceTelemetry(cpu_percent=1.0, rss_mb=100.0),
        tenants=[
            TenantTelemetry(
                model="efficientnet-lite0", backend="onnxruntime", device="cpu", instances=1,
                state="ready", queue_depth=0, fps=42.0,
            )
        ],
    )  # fmt: skip
    device.touch(telemetry=True)
    assert ids(fresh.page(by_fps, NOW)) == ["a"]
    assert fresh.page(FleetQuery(device_id="a"), NOW)["devices"][0]["fps"] == 42.0
    assert ids(fresh.page(FleetQuery(backend="onnxruntime"), NOW)) == ["a", "b", "c"]
    # The default page (no filter, by id) is a slice of the ids in order: a device joins, one leaves.
    add(fresh, "0", [])
    del fresh.devices["b"]
    assert ids(fresh.page(FleetQuery(), NOW)) == ["0", "a", "c"]
    assert ids(fresh.page(FleetQuery(desc=True, offset=1), NOW)) == ["a", "0"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (FleetQuery(sort="password"), "sort"),
        (FleetQuery(state="asleep"), "state"),
        (FleetQuery(limit=5000), "limit"),
        (FleetQuery(offset=-1), "offset"),
        (FleetQuery(tag=":north"), "tag"),
        (FleetQuery(placement="maybe"), "placement"),
    ],
)
def test_a_bad_query_is_refused_with_the_part_named(fleet, query, message):
    with pytest.raises(BadQuery, match=message):
        fleet.page(query, NOW)


# -- live rows: only those a page shows ---------------------------------------------------------
def test_a_watching_stream_gets_only_its_rows_and_the_counts():
    async def run() -> tuple[list[Any], list[Any], list[Any]]:
        hub = Hub()
        page = hub.subscribe(None, owner="ann", watch={"a", "c"})
        api = hub.subscribe(None, owner="bob")  # no watch: every changed row, as before
        device_page = hub.subscribe("a", owner="ann")
        assert hub.watched() is None
        rows = {d: {"device_id": d} for d in ("a", "b")}
        hub.to_fleet_rows(rows, ["c", "z"], {"counts": {"total": 3}})
        got = [json.loads(q.queue.get_nowait().split("data: ", 1)[1]) for q in (page, api)]
        assert device_page.queue.empty()
        hub.unsubscribe(api)
        assert hub.watched() == {"a", "c"}
        assert hub.find(page.stream_id) is page and hub.find("nope") is None
        return got[0]["devices"], got[0]["removed"], got[1]["devices"]

    mine, removed, everything = asyncio.run(run())
    assert mine == [{"device_id": "a"}] and removed == ["c"]
    assert [r["device_id"] for r in everything] == ["a", "b"]


# -- convergence and silence (the console's rules, no broker) -------------------------------------
@pytest.fixture
def console(tmp_path: Path) -> Console:
    return Console(ConsoleConfig(storage=StorageSettings(db=tmp_path / "console.db"), offline_after_s=60.0))


def placed(console: Console, device_id: str, *, reported: int, desired: int, refused: bool = False) -> Device:
    device = add(console.fleet, device_id, [tenant("efficientnet-lite0", "onnxruntime")], generation=reported)
    if refused and device.status is not None and device.status.placement is not None:
        device.status.placement.refused = Refusal(generation=desired, reason="unknown model", ts=NOW)
    device.desired = DesiredPlacement(
        desired, [TenantSpec(model="efficientnet-lite0")], NOW - 60, "ann", "edit"
    )
    return device


@pytest.mark.parametrize(
    ("reported", "desired", "refused", "online", "expected"),
    [
        (3, 4, False, True, True),  # behind: its node never had the retained placement
        (4, 4, False, True, False),  # has it
        (5, 4, False, True, False),  # ahead (another console's, or a newer edit)
        (3, 4, True, True, False),  # saw it and refused it: publishing again changes nothing
        (3, 4, False, False, False),  # offline: it gets it when it is back
    ],
)
def test_a_device_behind_its_desired_placement_needs_it_again(
    console, reported, desired, refused, online, expected
):
    device = placed(console, "d1", reported=reported, desired=desired, refused=refused)
    if not online and device.status is not None:
        device.status = device.status.model_copy(update={"online": False})
        device.touch()
    assert console.needs_placement(device) is expected


def test_a_placement_only_read_back_is_not_published_again(console):
    device = placed(console, "d1", reported=3, desired=4)
    assert console.needs_placement(device)
    assert device.desired is not None
    device.desired.published_at = None  # a retained document another publisher left
    assert not console.needs_placement(device)


def test_a_silent_device_is_shown_offline_until_it_sends_again(console):
    quiet = add(console.fleet, "quiet", [], seen_ago=61.0)
    add(console.fleet, "chatty", [], seen_ago=59.0)
    offline = add(console.fleet, "gone", [], seen_ago=600.0, online=False)
    assert console.mark_silent(NOW) == ["quiet"]
    assert not quiet.online and quiet.silent and not offline.silent
    page = console.fleet.page(FleetQuery(state="offline"), NOW)
    assert ids(page) == ["gone", "quiet"] and page["counts"]["silent"] == 1
    assert console.mark_silent(NOW) == []  # said once
    console.on_status("quiet", Status(online=True, device_id="quiet").model_dump_json().encode())
    assert quiet.online and not quiet.silent


# -- the agent's broker nodes ---------------------------------------------------------------------
def test_nodes_are_tried_in_turn_and_one_node_stays_put():
    nodes = Nodes([("a", 1883), ("b", 1884), ("c", 1885)])
    seen = [nodes.label]
    for _ in range(4):
        assert nodes.failed()
        seen.append(nodes.label)
    assert seen == ["a:1883", "b:1884", "c:1885", "a:1883", "b:1884"]
    single = Nodes([("::1", 1883)])
    assert not single.failed() and single.label == "[::1]:1883"
    with pytest.raises(ValueError):
        Nodes([])


def test_broker_nodes_from_the_file_and_from_the_flag(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "d1"\n[broker]\nnodes = ["mqtt://a:1883", "b:1884"]\n')
    cfg = load_config(path)
    assert cfg.broker.addresses() == [("a", 1883), ("b", 1884)]
    assert (cfg.broker.host, cfg.broker.port) == ("a", 1883)  # the client commands use the first
    flagged = load_config(path, broker_url="mqtts://x:8883,mqtts://y:8884")
    assert flagged.broker.addresses() == [("x", 8883), ("y", 8884)] and flagged.broker.tls.enabled
    assert load_config(path, broker_url="mqtt://z:1999").broker.addresses() == [("z", 1999)]
    for bad, why in [
        ('["mqtt://a:1883", "mqtts://b:8883"]', "all mqtt:// or all mqtts://"),
        ('["mqtt://user:secret@a:1883"]', "credentials"),
        ('["http://a"]', "scheme"),
    ]:
        path.write_text(f'device_id = "d1"\n[broker]\nnodes = {bad}\n')
        with pytest.raises(ConfigError, match=why) as info:
            load_config(path)
        assert "secret" not in str(info.value)

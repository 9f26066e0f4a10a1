"""Device pools' pure decisions as tables: when a member leaves and rejoins its pool's share
(agent/frames/pool.py), when the console adds or removes a member (cloud_console/pools_policy.py),
and the figures the console takes from members' announcements (cloud_console/pools.py)."""

from __future__ import annotations

import pytest

from agent.frames.pool import want_open
from agent.protocol.pools import PoolMemberState
from agent.protocol.topics import PoolTopics, filters_overlap, parse_pool_topic
from cloud_console.pools import PoolView
from cloud_console.pools_policy import Decision, MemberFigures, ScaleState, Target, decide


@pytest.mark.parametrize(
    ("open_now", "fill", "others_with_room", "expected"),
    [
        (True, 0.5, 1, True),  # room left: stay
        (True, 0.75, 1, False),  # three quarters full and another has room: leave
        (True, 1.0, 0, True),  # full, but no other member has room: the last one never leaves
        (False, 0.5, 1, False),  # left, still over a quarter: stay out
        (False, 0.25, 1, True),  # drained to a quarter: rejoin
        (False, 0.9, 0, True),  # the others left or went busy: rejoin at once
    ],
)
def test_a_member_leaves_the_share_when_full_only_while_another_has_room(
    open_now: bool, fill: float, others_with_room: int, expected: bool
) -> None:
    assert want_open(open_now, fill, others_with_room) is expected


def m(device: str, fps: float, busy: bool = False, errors: float = 0.0) -> MemberFigures:
    return MemberFigures(device, fps, errors, busy)


T = Target(fps=None, min_members=1, max_members=3, up_after_s=3, down_after_s=30, cooldown_s=10)
CASES = [
    # (members, capacity, target, state, now) -> (action, member)
    ("one member, idle", [m("a", 5)], 20.0, T, ScaleState(), 100, ("hold", None)),
    (
        "saturated, not yet long enough",
        [m("a", 20, True)],
        20.0,
        T,
        ScaleState(behind_since=99),
        100,
        ("hold", None),
    ),
    ("saturated for 3 s: add", [m("a", 20, True)], 20.0, T, ScaleState(behind_since=97), 100, ("add", None)),
    (
        "errors count as behind",
        [m("a", 20, errors=3), m("b", 20)],
        20.0,
        T,
        ScaleState(behind_since=90),
        100,
        ("add", None),
    ),
    (
        "one busy of two is not saturated",
        [m("a", 20, True), m("b", 5)],
        20.0,
        T,
        ScaleState(behind_since=90),
        100,
        ("hold", None),
    ),
    (
        "under the fps target with a busy member",
        [m("a", 20, True), m("b", 5)],
        20.0,
        Target(fps=40),
        ScaleState(behind_since=90),
        100,
        ("add", None),
    ),
    (
        "behind at max_members",
        [m("a", 20, True), m("b", 20, True), m("c", 20, True)],
        20.0,
        T,
        ScaleState(behind_since=0),
        100,
        ("hold", None),
    ),
    (
        "fewer than min_members",
        [m("a", 1)],
        20.0,
        Target(min_members=2, up_after_s=0),
        ScaleState(),
        100,
        ("add", None),
    ),
    (
        "cooldown holds a due change",
        [m("a", 20, True)],
        20.0,
        T,
        ScaleState(behind_since=0, last_change=95),
        100,
        ("hold", None),
    ),
    (
        "spare for 30 s: remove the least used",
        [m("a", 6), m("b", 2)],
        20.0,
        T,
        ScaleState(spare_since=70),
        100,
        ("remove", "b"),
    ),
    (
        "spare, not yet long enough",
        [m("a", 6), m("b", 2)],
        20.0,
        T,
        ScaleState(spare_since=80),
        100,
        ("hold", None),
    ),
    (
        "the rest would run over 60%",
        [m("a", 8), m("b", 8)],
        20.0,
        T,
        ScaleState(spare_since=0),
        100,
        ("hold", None),
    ),
    (
        "capacity never measured: keep",
        [m("a", 1), m("b", 1)],
        None,
        T,
        ScaleState(spare_since=0),
        100,
        ("hold", None),
    ),
    (
        "never under min_members",
        [m("a", 1), m("b", 1)],
        20.0,
        Target(min_members=2),
        ScaleState(spare_since=0),
        100,
        ("hold", None),
    ),
    (
        "the fps target needs both",
        [m("a", 2), m("b", 2)],
        20.0,
        Target(fps=15, down_after_s=0),
        ScaleState(),
        100,
        ("hold", None),
    ),
    (
        "a busy member blocks removal",
        [m("a", 2, True), m("b", 2)],
        20.0,
        T,
        ScaleState(spare_since=0),
        100,
        ("hold", None),
    ),
]


@pytest.mark.parametrize(
    ("members", "capacity", "target", "state", "now", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_scaling_policy(
    members: list[MemberFigures],
    capacity: float | None,
    target: Target,
    state: ScaleState,
    now: float,
    expected: tuple[str, str | None],
) -> None:
    decision = decide(members, capacity, target, state, now)
    assert (decision.action, decision.member) == expected, decision.reason
    if decision.action != "hold":
        assert decision.state == ScaleState(last_change=now), "a change restarts the hysteresis"


def test_hysteresis_needs_the_condition_to_hold_throughout() -> None:
    """Behind, then fine for one look, then behind again: the clock starts over."""
    state = ScaleState()
    busy, calm = [m("a", 20, True)], [m("a", 10)]
    for now, members in ((0, busy), (2, busy), (2.5, calm), (4, busy), (6, busy)):
        decision: Decision = decide(members, 20.0, T, state, now)
        state = decision.state
        assert decision.action == "hold", (now, decision.reason)
    assert decide(busy, 20.0, T, state, 7).action == "add"


def announce(view: PoolView, device: str, served: int, busy: bool = False, errors: int = 0) -> None:
    state = PoolMemberState(
        device_id=device,
        pool="p",
        model="m",
        open=True,
        busy=busy,
        queued=0,
        depth=8,
        served=served,
        errors=errors,
        latency_ms_sum=served * 20.0,
    )
    view.on_announcement(state.model_dump_json().encode())


def test_the_console_takes_rates_shares_latency_and_capacity_from_announcements() -> None:
    now = [0.0]
    view = PoolView(clock=lambda: now[0])
    for t, a, b in ((0, 0, 0), (1, 30, 10), (2, 60, 20)):
        now[0] = t
        announce(view, "a", a, busy=t == 2)
        announce(view, "b", b)
    summary = view.summary("p", "m")
    assert summary["fps"] == 40.0 and summary["latency_ms"] == 20.0
    assert {r["device_id"]: r["share"] for r in summary["members"]} == {"a": 0.75, "b": 0.25}
    assert summary["capacity_fps"] == 30.0, "what a busy member served"
    now[0] = 10.0  # b restarts: its counters go back, its window starts again
    announce(view, "b", 0)
    assert [f.fps for f in view.figures("p", "m") if f.device_id == "b"] == [0.0]
    now[0] = 20.0  # both silent for longer than the members' TTL
    assert view.figures("p", "m") == []
    view.on_announcement(b'{"device_id": 1}')
    assert view.bad == 1


def test_pool_topics_never_overlap_a_devices_and_parse_back() -> None:
    topics = PoolTopics("driveway", "edge")
    assert topics.share("lite0") == "$share/driveway/edge/pool/driveway/infer/lite0"
    for device_filter in ("edge/+/infer", "edge/+/infer/+", "edge/pool/infer/+"):
        assert not filters_overlap(topics.infer_any_model, device_filter)
    assert parse_pool_topic(topics.members, "edge") == ("driveway", "members")
    assert parse_pool_topic("edge/dev1/status", "edge") is None
    with pytest.raises(ValueError, match="pool name"):
        PoolTopics("Drive/way")

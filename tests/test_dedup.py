"""The memory of recent request ids behind duplicate frames (agent/frames/dedup.py), without a broker."""

from __future__ import annotations

import threading

from agent.frames.dedup import Answered, First, InFlight, RecentRequests


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_arrival_then_in_flight_then_answered():
    recent: RecentRequests[str] = RecentRequests()
    key = ("m", "r1")
    assert recent.arrive(key, "first") == First()
    assert recent.arrive(key, "again") == InFlight()
    assert recent.settle(key, b"answer") == ["again"]  # the repeat gets the same answer
    assert recent.arrive(key, "later") == Answered(b"answer")


def test_a_redelivery_in_flight_is_not_attached():
    recent: RecentRequests[str] = RecentRequests()
    recent.arrive(("m", "r1"), "first")
    assert recent.arrive(("m", "r1"), None) == InFlight()
    assert recent.settle(("m", "r1"), b"a") == []


def test_an_error_is_forgotten_so_that_a_retry_runs():
    recent: RecentRequests[str] = RecentRequests()
    recent.arrive(("m", "r1"), "first")
    recent.arrive(("m", "r1"), "waiting")
    assert recent.settle(("m", "r1"), None) == ["waiting"]  # it gets the error too
    assert recent.arrive(("m", "r1"), "retry") == First()


def test_the_same_id_for_another_model_is_another_request():
    recent: RecentRequests[str] = RecentRequests()
    assert recent.arrive(("a", "r1"), None) == First()
    assert recent.arrive(("b", "r1"), None) == First()


def test_answers_expire_after_the_window():
    clock = Clock()
    recent: RecentRequests[str] = RecentRequests(max_age_s=60, clock=clock)
    recent.arrive(("m", "r1"), None)
    recent.settle(("m", "r1"), b"a")
    clock.now += 59
    assert recent.arrive(("m", "r1"), None) == Answered(b"a")
    clock.now += 2
    assert recent.arrive(("m", "r1"), None) == First()


def test_bounded_by_count_and_bytes_oldest_answers_first():
    recent: RecentRequests[str] = RecentRequests(max_entries=3, max_bytes=1000)
    for i in range(3):
        recent.arrive(("m", f"r{i}"), None)
        recent.settle(("m", f"r{i}"), b"x" * 100)
    recent.arrive(("m", "in-flight"), None)  # a 4th entry: the oldest answer goes
    assert len(recent) == 3
    assert recent.arrive(("m", "r0"), None) == First()
    big: RecentRequests[str] = RecentRequests(max_entries=100, max_bytes=250)
    for i in range(3):
        big.arrive(("m", f"r{i}"), None)
        big.settle(("m", f"r{i}"), b"x" * 100)
    assert len(big) == 2 and big.arrive(("m", "r2"), None) == Answered(b"x" * 100)


def test_frames_in_flight_are_never_evicted():
    recent: RecentRequests[str] = RecentRequests(max_entries=2)
    for i in range(5):
        recent.arrive(("m", f"r{i}"), None)
    assert len(recent) == 5  # each is answered soon; evicting one would run its repeat twice
    assert recent.arrive(("m", "r0"), "w") == InFlight()


def test_disabled_when_the_window_or_the_size_is_zero():
    assert not RecentRequests(max_entries=0).enabled
    assert not RecentRequests(max_age_s=0).enabled
    assert RecentRequests().enabled


def test_settled_from_other_threads():
    recent: RecentRequests[int] = RecentRequests()
    for i in range(2000):
        recent.arrive(("m", str(i)), None)
    threads = [
        threading.Thread(target=lambda k=k: [recent.settle(("m", str(i)), b"a") for i in range(k, 2000, 4)])
        for k in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(recent.arrive(("m", str(i)), None) == Answered(b"a") for i in range(2000))

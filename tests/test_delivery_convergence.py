"""Delivery convergence, pure (cloud_console/convergence.py): what the console sends a device again
and when it publishes a refused placement again. The end-to-end path (a device offline at delivery
time, back, installed, placed) is in tests/test_delivery.py."""

from __future__ import annotations

from cloud_console.convergence import MAX_SENDS, RESEND_S, Convergence

V1 = ("m", "1")
V2 = ("m", "2")


def test_nothing_goes_to_an_offline_device_and_all_of_it_once_it_is_back():
    c = Convergence()
    c.sent("d", "m", "2", "http://console", now=10.0)  # published while the device was offline
    c.seen("d", online=False, now=11.0)
    assert c.due("d", installed={V1}, pinned=[], now=12.0) == []
    c.seen("d", online=True, now=13.0)
    assert c.due("d", installed={V1}, pinned=[], now=13.0) == [("m", "2", "http://console")]


def test_a_device_that_stays_online_is_sent_again_only_after_resend_s():
    c = Convergence()
    c.seen("d", online=True, now=0.0)
    c.sent("d", "m", "2", "http://console", now=1.0)
    assert c.due("d", installed=set(), pinned=[], now=1.0 + RESEND_S / 2) == []
    assert [v for *v, _ in c.due("d", installed=set(), pinned=[], now=1.0 + RESEND_S)] == [["m", "2"]]


def test_installed_versions_are_forgotten_and_sends_are_capped():
    c = Convergence()
    c.seen("d", online=True, now=0.0)
    for n in range(MAX_SENDS):
        c.sent("d", "m", "2", None, now=n * RESEND_S)
    assert c.due("d", installed=set(), pinned=[], now=(MAX_SENDS + 1) * RESEND_S) == []  # given up
    c.sent("d", "m", "3", None, now=0.0)
    c.due("d", installed={("m", "3")}, pinned=[], now=1.0)
    assert ("m", "3") not in c.devices["d"].versions


def test_the_desired_placements_pinned_versions_are_wanted_too():
    c = Convergence()
    c.seen("d", online=True, now=0.0)
    assert c.due("d", installed={V1}, pinned=[V1, V2], now=0.0) == [("m", "2", None)]


def test_a_refused_placement_is_published_again_once_its_versions_are_installed():
    c = Convergence()
    # refused while the version was missing: not yet
    assert not c.republish("d", desired=3, refused=3, applied=1, installed={V1}, pinned=[V2])
    assert c.republish("d", desired=3, refused=3, applied=1, installed={V1, V2}, pinned=[V2])
    assert not c.republish("d", desired=3, refused=3, applied=1, installed={V1, V2}, pinned=[V2])  # once
    assert not c.republish("d", desired=4, refused=3, applied=1, installed={V2}, pinned=[V2])  # not refused
    assert not c.republish("d", desired=5, refused=5, applied=5, installed={V2}, pinned=[V2])  # applied


def test_a_placement_refused_for_another_reason_is_not_published_again():
    """Refused unsigned, or for a bad device: publishing the same tenants again would not help, and
    must not turn a document someone else published into one the console signs."""
    c = Convergence()
    assert not c.republish("d", desired=3, refused=3, applied=1, installed={V1}, pinned=[])
    assert not c.republish(
        "d", desired=3, refused=3, applied=1, installed={V1, V2}, pinned=[V2]
    )  # never lacked

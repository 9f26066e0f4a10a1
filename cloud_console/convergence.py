"""Delivery convergence, pure: which model versions the console sends a device again, and when a
placement refused for want of them is published again (docs/fleet.md "A device that was offline").

Manifests go out on `edge/<id>/models` at QoS 1, not retained: a device offline at that moment never
sees one. So the console keeps what each device was asked to install (a delivery, or a placement that
follows delivery) and compares it with every status the device sends: a version the device still
lacks is sent again once the device is online, at once after it comes back, else at most every
`RESEND_S`, `MAX_SENDS` times in all. The agent ignores a version it has or is fetching, so a
manifest sent twice costs nothing. Once the device has every version its desired placement pins, a
placement it refused (it lacked them) is published again, once per generation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

RESEND_S = 60.0  # a device that stays online without installing: its download failed or is slow
MAX_SENDS = 5  # then it is left to the operator (the device's status says why it failed)

Version = tuple[str, str]  # (model, version)


@dataclass
class Wanted:
    """One version a device should install."""

    base_url: str | None  # the console URL the manifest points at (None: the configured public_url)
    sends: int = 0
    last_sent: float | None = None  # monotonic


@dataclass
class DeviceWants:
    versions: dict[Version, Wanted] = field(default_factory=dict)  # asked for, not yet installed
    online_since: float | None = None  # monotonic; None while offline
    republished: int | None = None  # the desired generation published again for it
    lacked: set[Version] = field(default_factory=set)  # pinned versions a status showed missing


class Convergence:
    def __init__(self, resend_s: float = RESEND_S, max_sends: int = MAX_SENDS) -> None:
        self.resend_s = resend_s
        self.max_sends = max_sends
        self.devices: dict[str, DeviceWants] = {}

    def _of(self, device_id: str) -> DeviceWants:
        return self.devices.setdefault(device_id, DeviceWants())

    def want(self, device_id: str, model: str, version: str, base_url: str | None) -> None:
        """The device should install `model` `version` (a delivery, or a placement following one)."""
        self._of(device_id).versions.setdefault((model, version), Wanted(base_url))

    def sent(self, device_id: str, model: str, version: str, base_url: str | None, now: float) -> None:
        """A manifest for it went out now."""
        wanted = self._of(device_id).versions.setdefault((model, version), Wanted(base_url))
        wanted.sends += 1
        wanted.last_sent = now
        wanted.base_url = base_url or wanted.base_url

    def seen(self, device_id: str, online: bool, now: float) -> None:
        """A status arrived: note when the device came (back) online."""
        wants = self._of(device_id)
        if not online:
            wants.online_since = None
        elif wants.online_since is None:
            wants.online_since = now

    def due(
        self, device_id: str, installed: set[Version], pinned: Iterable[Version], now: float
    ) -> list[tuple[str, str, str | None]]:
        """(model, version, base_url) to send the device now. Installed versions are forgotten;
        `pinned` are the versions its desired placement names (wanted from now on)."""
        wants = self._of(device_id)
        for model, version in pinned:
            wants.versions.setdefault((model, version), Wanted(None))
            if (model, version) not in installed:
                wants.lacked.add((model, version))
        for done in [v for v in wants.versions if v in installed]:
            del wants.versions[done]
        if wants.online_since is None:
            return []
        out = []
        for (model, version), wanted in sorted(wants.versions.items()):
            if wanted.sends >= self.max_sends:
                continue
            last = wanted.last_sent
            # Never sent, sent before the device came back (it was offline), or sent long ago.
            if last is None or last < wants.online_since or now - last >= self.resend_s:
                out.append((model, version, wanted.base_url))
        return out

    def republish(
        self,
        device_id: str,
        desired: int | None,
        refused: int | None,
        applied: int | None,
        installed: set[Version],
        pinned: Iterable[Version],
    ) -> bool:
        """True (once per generation): the device refused its desired placement, has not applied
        it, lacked a version it pins and now has every one, so it should get the placement again.
        A refusal for another reason (unsigned, a bad device) is never answered by publishing again."""
        wants = self._of(device_id)
        pinned = list(pinned)
        wants.lacked.update(v for v in pinned if v not in installed)
        if desired is None or refused != desired or (applied is not None and applied >= desired):
            return False
        if not any(v in wants.lacked for v in pinned):
            return False
        if wants.republished == desired or not all(v in installed for v in pinned):
            return False
        wants.republished = desired
        return True

    def give_up(self, device_id: str, model: str, version: str) -> None:
        """Not sent again (the model store does not have it)."""
        wanted = self._of(device_id).versions.get((model, version))
        if wanted is not None:
            wanted.sends = self.max_sends

    def forget(self, device_id: str) -> None:
        self.devices.pop(device_id, None)

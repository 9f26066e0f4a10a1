"""Server-sent events: a hub that fans fleet changes out to browser pages.

Fleet pages get one `fleet` event per second with the summaries of the devices that changed (never
one event per MQTT message: 500 devices would flood a browser). Device pages get that device's
`status` and `telemetry` events as they arrive. A page that cannot keep up is disconnected; its
EventSource reconnects and the page reloads the full state, so no one blocks ingest.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

QUEUE_SIZE = 256


@dataclass(eq=False)
class Subscriber:
    device_id: str | None  # None: the fleet page
    queue: asyncio.Queue[str | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    closed: bool = False


def format_event(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class Hub:
    def __init__(self) -> None:
        self._subscribers: set[Subscriber] = set()
        self.dropped_subscribers = 0

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(self, device_id: str | None) -> Subscriber:
        sub = Subscriber(device_id)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def wants_device(self, device_id: str) -> bool:
        return any(s.device_id == device_id for s in self._subscribers)

    def watched_devices(self) -> set[str]:
        """The devices a device page is open for."""
        return {s.device_id for s in self._subscribers if s.device_id is not None}

    def has_fleet_pages(self) -> bool:
        return any(s.device_id is None for s in self._subscribers)

    def _put(self, sub: Subscriber, text: str) -> None:
        try:
            sub.queue.put_nowait(text)
        except asyncio.QueueFull:
            # A stalled page: cut it loose (its EventSource reconnects and reloads).
            log.info("dropping a slow event stream (device=%s)", sub.device_id)
            self.dropped_subscribers += 1
            self._subscribers.discard(sub)
            sub.closed = True
            while not sub.queue.empty():
                sub.queue.get_nowait()
            sub.queue.put_nowait(None)

    def to_device(self, device_id: str, event: str, data: Any) -> None:
        subs = [s for s in self._subscribers if s.device_id == device_id]
        if not subs:
            return
        text = format_event(event, data)
        for sub in subs:
            self._put(sub, text)

    def to_fleet(self, event: str, data: Any) -> None:
        subs = [s for s in self._subscribers if s.device_id is None]
        if not subs:
            return
        text = format_event(event, data)
        for sub in subs:
            self._put(sub, text)

    def close_all(self) -> None:
        for sub in list(self._subscribers):
            sub.closed = True
            if sub.queue.full():
                sub.queue.get_nowait()
            sub.queue.put_nowait(None)
        self._subscribers.clear()

"""Server-sent events: a hub that fans fleet changes out to browser pages.

Fleet pages get one `fleet` event per second with the fleet-wide counts and the summaries of the
devices that changed (never one event per MQTT message). A page that says which rows it shows
(`watch`) gets only those: at 10,000 devices a fleet changes ~2,000 rows a second, a page shows 100.
Device pages get that device's `status` and `telemetry` events as they arrive. A page that cannot
keep up is disconnected; its EventSource reconnects and the page reloads, so no one blocks ingest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

QUEUE_SIZE = 256


@dataclass(eq=False)
class Subscriber:
    device_id: str | None  # None: the fleet page
    owner: str = ""  # the user who opened it (only they may change what it watches)
    watch: set[str] | None = None  # a fleet stream: the rows it carries (None: every changed row)
    stream_id: str = field(default_factory=lambda: secrets.token_urlsafe(16))
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

    def subscribe(self, device_id: str | None, owner: str = "", watch: set[str] | None = None) -> Subscriber:
        sub = Subscriber(device_id, owner, watch)
        self._subscribers.add(sub)
        return sub

    def find(self, stream_id: str) -> Subscriber | None:
        return next((s for s in self._subscribers if s.stream_id == stream_id), None)

    def watched(self) -> set[str] | None:
        """The devices whose rows fleet streams carry; None when one of them takes every row."""
        out: set[str] = set()
        for sub in self._subscribers:
            if sub.device_id is None:
                if sub.watch is None:
                    return None
                out |= sub.watch
        return out

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def wants_device(self, device_id: str) -> bool:
        return any(s.device_id == device_id for s in self._subscribers)

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

    def to_fleet_rows(self, rows: dict[str, Any], removed: Iterable[str], common: dict[str, Any]) -> None:
        """A `fleet` event per fleet stream: `common` (counts, stats) plus the changed rows it carries."""
        gone = list(removed)
        every: str | None = None
        for sub in [s for s in self._subscribers if s.device_id is None]:
            if sub.watch is None:
                if every is None:
                    every = format_event("fleet", {"devices": list(rows.values()), "removed": gone, **common})
                self._put(sub, every)
                continue
            mine = [rows[d] for d in sorted(sub.watch.intersection(rows))]
            data = {"devices": mine, "removed": [d for d in gone if d in sub.watch], **common}
            self._put(sub, format_event("fleet", data))

    def close_all(self) -> None:
        for sub in list(self._subscribers):
            sub.closed = True
            if sub.queue.full():
                sub.queue.get_nowait()
            sub.queue.put_nowait(None)
        self._subscribers.clear()

"""Outgoing results: every answer waits here until the broker acknowledged it.

Worker threads hand messages in with `put` (thread-safe). One task publishes them at QoS 1 with a
bounded number in flight; a publish that fails while the broker is away goes back to the front and
is sent again after the reconnect, so an accepted frame's answer is not lost to a broker outage.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt_session import MqttSession, NotConnected

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    correlation_data: bytes | None = None

    def properties(self) -> Properties | None:
        if self.correlation_data is None:
            return None
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = self.correlation_data
        return props


class Outbox:
    def __init__(self, session: MqttSession, loop: asyncio.AbstractEventLoop, max_inflight: int = 64) -> None:
        self._session = session
        self._loop = loop
        self._pending: deque[Outgoing] = deque()
        self._wake = asyncio.Event()
        self._inflight = asyncio.Semaphore(max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.retried = 0

    def __len__(self) -> int:
        return len(self._pending) + len(self._tasks)

    def put(self, message: Outgoing) -> None:
        """Thread-safe: callable from worker threads."""
        self._loop.call_soon_threadsafe(self._append, message)

    def _append(self, message: Outgoing) -> None:
        self._pending.append(message)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self._session.connected.wait()
                await self._inflight.acquire()
                if not self._pending:
                    self._inflight.release()
                    break
                message = self._pending.popleft()
                task = asyncio.create_task(self._send(message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send(self, message: Outgoing) -> None:
        try:
            await self._session.publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=message.retain,
                properties=message.properties(),
            )
            self.sent += 1
        except NotConnected:
            self.retried += 1
            self._pending.appendleft(message)
            self._wake.set()
            await asyncio.sleep(0.05)  # the session notices the drop and clears `connected`
        finally:
            self._inflight.release()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued is acknowledged (or the timeout); True when empty."""
        deadline = self._loop.time() + timeout_s
        while len(self) and self._loop.time() < deadline:  # noqa: ASYNC110 (shutdown only)
            await asyncio.sleep(0.02)
        return len(self) == 0

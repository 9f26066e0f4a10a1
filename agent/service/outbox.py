"""Outgoing results and telemetry: every message waits, on disk, until the broker has it.

Worker threads hand messages in with `put` (thread-safe). One task publishes them in order with a
bounded number in flight (done when the broker's PUBACK, or PUBCOMP at QoS 2, arrives). A message in
flight when the connection drops stays with the session's MQTT client, which sends it again after the
reconnect with the same packet id (so a QoS 2 result is still delivered once); what was not handed
to the client yet waits here, in order. Every message is also written to SQLite (`outbox.db` in the
state dir) by a writer thread in small batches, and deleted once acknowledged, so answers survive a
broker outage of any length and an agent restart: Mosquitto saves its own state only periodically,
so the agent does not rely on the broker to keep its results.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import queue
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.service.mqtt_session import MqttSession, NotConnected

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Outgoing:
    seq: int = field(compare=True)
    topic: str = field(compare=False)
    payload: bytes = field(compare=False)
    qos: int = field(default=1, compare=False)
    retain: bool = field(default=False, compare=False)
    correlation_data: bytes | None = field(default=None, compare=False)

    def properties(self) -> Properties | None:
        if self.correlation_data is None:
            return None
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = self.correlation_data
        return props


def _size(message: Outgoing) -> int:
    return len(message.payload) + len(message.topic) + len(message.correlation_data or b"")


class OutboxStore:
    """SQLite persistence for the outbox, written by one thread in batches (cheap on the hot path)."""

    def __init__(self, path: Path, flush_interval_s: float = 0.05) -> None:
        self.path = path
        self.flush_interval_s = flush_interval_s
        self._ops: queue.Queue[tuple[str, Outgoing | int]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL,"
            " payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, correlation BLOB)"
        )
        return conn

    def load(self) -> list[Outgoing]:
        """Messages left unacknowledged by an earlier run, oldest first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT seq, topic, payload, qos, retain, correlation FROM outbox ORDER BY seq"
            ).fetchall()
        return [Outgoing(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5]) for r in rows]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-writer", daemon=True)
        self._thread.start()

    def add(self, message: Outgoing) -> None:
        self._ops.put(("add", message))

    def ack(self, seq: int) -> None:
        self._ops.put(("ack", seq))

    def _run(self) -> None:
        conn = self._connect()
        try:
            while not self._stop.wait(self.flush_interval_s):
                self._flush(conn)
            self._flush(conn)
        finally:
            conn.close()

    def _flush(self, conn: sqlite3.Connection) -> None:
        adds: dict[int, Outgoing] = {}
        acks: list[int] = []
        while True:
            try:
                op, item = self._ops.get_nowait()
            except queue.Empty:
                break
            if op == "add" and isinstance(item, Outgoing):
                adds[item.seq] = item
            elif isinstance(item, int) and adds.pop(item, None) is None:
                acks.append(item)  # (an ack of a message still in `adds` means it never reached the disk)
        if not adds and not acks:
            return
        try:
            with conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (m.seq, m.topic, m.payload, m.qos, int(m.retain), m.correlation_data)
                        for m in adds.values()
                    ],
                )
                conn.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in acks])
        except sqlite3.Error:
            log.exception("outbox: could not persist %d messages", len(adds))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30.0)


class Outbox:
    def __init__(
        self,
        session: MqttSession,
        loop: asyncio.AbstractEventLoop,
        store: OutboxStore | None = None,
        unsent: list[Outgoing] | None = None,
        max_inflight: int = 256,
        max_pending: int = 200_000,
        max_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self._session = session
        self._loop = loop
        self._store = store
        self._pending: list[Outgoing] = []  # a heap by sequence number: original order, also after retries
        self._inflight: dict[int, Outgoing] = {}  # handed to the client, waiting for the broker's ack
        self._wake = asyncio.Event()
        self._incoming: list[tuple[str, bytes, int, bytes | None]] = []  # from worker threads
        self._incoming_lock = threading.Lock()
        self._wake_pending = False
        self._pumping = False
        self._max_inflight = max_inflight
        self._max_pending = max_pending
        # Bytes held (pending + in flight): senders choose correlation data and response topics of up
        # to 64 KiB each, so a count alone does not bound memory.
        self._max_bytes = max_bytes
        self._bytes = 0
        self._seq = itertools.count(1)
        self.sent = 0
        self.dropped = 0  # never sent: the spool was full, or paho would not take it
        self.refused = 0  # the broker refused them (dropped, not retried: docs/reliability.md)
        for message in unsent or []:  # left by an earlier run (OutboxStore.load, read off the loop)
            heapq.heappush(self._pending, message)
            self._bytes += _size(message)
        if self._pending:
            log.info("outbox: %d unsent messages from the last run will be sent", len(self._pending))
            self._seq = itertools.count(max(m.seq for m in self._pending) + 1)
        if store is not None:
            store.start()

    def __len__(self) -> int:
        return len(self._pending) + len(self._inflight)

    def put(self, topic: str, payload: bytes, qos: int = 1, correlation_data: bytes | None = None) -> None:
        """Thread-safe: callable from worker threads."""
        self.put_many([(topic, payload, qos, correlation_data)])

    def put_many(self, messages: list[tuple[str, bytes, int, bytes | None]]) -> None:
        """Thread-safe. Wake-ups of the event loop are coalesced: under load, one wake-up carries
        the answers of many frames (each wake-up is a pipe write, a loop turn and a pipe read)."""
        with self._incoming_lock:
            self._incoming.extend(messages)
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._take_incoming)
        except RuntimeError:  # the loop is closed (after shutdown): nothing will send these now
            with self._incoming_lock:
                self._wake_pending = False
            raise

    def _take_incoming(self) -> None:
        with self._incoming_lock:
            batch, self._incoming = self._incoming, []
            self._wake_pending = False
        for topic, payload, qos, correlation_data in batch:
            self._append(topic, payload, qos, correlation_data)
        self._pump()

    def _append(self, topic: str, payload: bytes, qos: int, correlation_data: bytes | None) -> None:
        message = Outgoing(next(self._seq), topic, payload, qos, False, correlation_data)
        size = _size(message)
        # A bounded spool: an outage can fill neither the memory nor the disk. The oldest go first.
        while self._pending and (
            len(self._pending) >= self._max_pending or self._bytes + size > self._max_bytes
        ):
            oldest = heapq.heappop(self._pending)
            self._bytes -= _size(oldest)
            self.dropped += 1
            if self._store is not None:
                self._store.ack(oldest.seq)
        heapq.heappush(self._pending, message)
        self._bytes += size
        if self._store is not None:
            self._store.add(message)

    def _pump(self) -> None:
        """Hand pending messages to the client, in order, while connected and under the in-flight
        bound. Runs on the loop right where messages or acks arrive (no task switch per result);
        `run` takes over when the session is down."""
        if self._pumping:  # a QoS 0 publish acks inside publish_nowait: the loop below goes on
            return
        self._pumping = True
        try:
            self._pump_now()
        finally:
            self._pumping = False

    def _pump_now(self) -> None:
        session = self._session
        while self._pending and len(self._inflight) < self._max_inflight:
            if not session.connected.is_set():
                self._wake.set()  # `run` waits for the connection, then pumps again
                return
            message = heapq.heappop(self._pending)
            self._inflight[message.seq] = message
            try:
                session.publish_nowait(
                    message.topic,
                    message.payload,
                    message.qos,
                    message.retain,
                    message.properties(),
                    functools.partial(self._acked, message),
                    functools.partial(self._refused, message),
                )
            except NotConnected:
                self._inflight.pop(message.seq, None)
                heapq.heappush(self._pending, message)
                self._wake.set()
                return
            except Exception:  # a message paho will never take (e.g. an oversized topic)
                self._inflight.pop(message.seq, None)
                self._bytes -= _size(message)
                self.dropped += 1
                if self._store is not None:
                    self._store.ack(message.seq)  # or it would fail again at every start
                log.exception(
                    "outbox: dropped a message that cannot be published (topic %.80r)", message.topic
                )

    async def run(self) -> None:
        """Sends what is left when no message or ack triggers a pump: after a reconnect, or
        messages loaded from the last run."""
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._session.connected.is_set():
                await self._session.connected.wait()
            before = len(self._pending)
            self._pump()
            if self._pending and len(self._pending) == before and len(self._inflight) < self._max_inflight:
                await asyncio.sleep(0.05)  # the session notices the drop and clears `connected`
                self._wake.set()

    def _acked(self, message: Outgoing) -> None:
        if self._inflight.pop(message.seq, None) is None:
            return
        self._bytes -= _size(message)
        self.sent += 1
        if self._store is not None:
            self._store.ack(message.seq)
        if self._pending:
            self._pump()  # room in flight again

    def _refused(self, message: Outgoing, _reason: object) -> None:
        """The broker refused it (an ACL, a quota): not transient, so it is dropped, not sent again
        (the session logged the topic and counted it). Later messages go on."""
        if self._inflight.pop(message.seq, None) is None:
            return
        self._bytes -= _size(message)
        self.refused += 1
        if self._store is not None:
            self._store.ack(message.seq)  # or it would be refused again at every start
        if self._pending:
            self._pump()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued is acknowledged (or the timeout); True when empty."""
        deadline = self._loop.time() + timeout_s
        while len(self) and self._loop.time() < deadline:  # noqa: ASYNC110 (shutdown only)
            await asyncio.sleep(0.02)
        return len(self) == 0

    def close(self) -> None:
        """Persist what is still pending (it is sent at the next start). Call after the loop's last
        turn with the outbox: answers handed in since then are persisted here too."""
        with self._incoming_lock:
            late, self._incoming = self._incoming, []
        for topic, payload, qos, correlation_data in late:
            self._append(topic, payload, qos, correlation_data)
        if self._store is not None:
            self._store.stop()

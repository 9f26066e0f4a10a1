"""The benchmark's camera: a lean MQTT 5 load generator on a raw socket.

Why not paho or aiomqtt: on a 2-core machine the load generator shares the cores with the agent, and
a Python MQTT client spends ~0.5 ms of CPU per request-reply, which the benchmark would then charge
to the agent. In the field the camera is another host. This generator writes pre-encoded PUBLISH
packets (the JPEG is not copied: `sendmsg` with a header and the payload) and parses only what it
needs of the replies, about 20 µs of CPU per frame, so the cores go to the system under test.

Frames go to `edge/<id>/infer` at QoS 0 (a camera's late frame is worth less than the next one) with
the request id as MQTT 5 correlation data and no response topic; answers are read from the device's
result topic, the topic every consumer of a camera stream subscribes to.
"""

from __future__ import annotations

import contextlib
import gc
import json
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

CONNECT, CONNACK, PUBLISH, SUBSCRIBE, SUBACK = 1, 2, 3, 8, 9
CORRELATION_DATA = 0x09


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("!H", len(raw)) + raw


def packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + varint(len(body)) + body


def correlation_data(props: bytes) -> str | None:
    """The correlation data among a PUBLISH's MQTT 5 properties, if any."""
    fixed = {0x01: 1, 0x02: 4, 0x23: 2}  # payload format, message expiry, topic alias
    prefixed = {0x03, 0x08, 0x09}  # content type, response topic, correlation data: 2-byte length
    pos = 0
    while pos < len(props):
        ident = props[pos]
        pos += 1
        if ident in fixed:
            pos += fixed[ident]
        elif ident in prefixed:
            n = struct.unpack_from("!H", props, pos)[0]
            if ident == CORRELATION_DATA:
                return props[pos + 2 : pos + 2 + n].decode(errors="replace")
            pos += 2 + n
        elif ident == 0x26:  # user property: two strings
            for _ in range(2):
                pos += 2 + struct.unpack_from("!H", props, pos)[0]
        elif ident == 0x0B:  # subscription identifier: a varint
            while props[pos] & 0x80:
                pos += 1
            pos += 1
        else:
            return None
    return None


class ProtocolError(Exception):
    pass


@dataclass
class Tally:
    """Replies seen in the counted window: latencies (ms) of good answers, and errors by code; and
    every result of the run, warm-up included (what the agent's own counters must show)."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    results: int = 0


def run_prefix(name: str) -> str:
    """`name` and a random tag: ids that no earlier run used. The agent answers an id it served
    recently from memory, without inference (docs/protocol.md, "Duplicates"); a benchmark that
    repeated ids would count those answers as throughput."""
    return f"{name}-{secrets.token_hex(4)}"


class LoadGenerator:
    """One MQTT 5 connection that publishes frames and collects the device's results.

    Its client id and every run's request ids carry a random tag, so no id repeats across runs,
    generators or benchmark invocations against the same agent."""

    def __init__(
        self,
        host: str,
        port: int,
        device_id: str,
        model: str | None = None,
        client_id: str = "edge-bench-camera",
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        # CONNECT: protocol "MQTT" v5, clean start, keepalive 0 (a benchmark run is short), no props.
        self.name = run_prefix(client_id)
        body = utf8("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 0) + varint(0) + utf8(self.name)
        self.sock.sendall(packet(CONNECT, 0, body))
        kind, payload = self._read_packet()
        if kind != CONNACK or payload[1] != 0:
            raise ProtocolError(f"broker refused the connection: {payload!r}")
        # SUBSCRIBE to the result topic, QoS 0 (no acks to send back: less work on both sides).
        sub = struct.pack("!H", 1) + varint(0) + utf8(f"edge/{device_id}/result") + bytes([0])
        self.sock.sendall(packet(SUBSCRIBE, 0x02, sub))
        kind, payload = self._read_packet()
        if kind != SUBACK or payload[-1] > 2:
            raise ProtocolError(f"subscribe refused: {payload!r}")
        self.sock.settimeout(None)
        # A model named in the topic (`/infer/<model>`) routes the frame; else the device's default.
        self.topic = utf8(f"edge/{device_id}/infer" + (f"/{model}" if model else ""))
        self._sent: dict[str, float] = {}
        self._lock = threading.Lock()
        self.on_reply: Callable[[str, float, str | None], None] = lambda _id, _ms, _err: None
        self._reader = threading.Thread(target=self._read_loop, name="loadgen-reader", daemon=True)
        self._reader.start()

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ProtocolError("broker closed the connection")
            self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _read_packet(self) -> tuple[int, bytes]:
        first = self._read_exact(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._read_exact(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first >> 4, self._read_exact(length)

    def _read_loop(self) -> None:
        try:
            while True:
                kind, body = self._read_packet()
                if kind != PUBLISH:
                    continue
                topic_len = struct.unpack_from("!H", body)[0]
                pos = 2 + topic_len  # QoS 0: no packet id
                props_len, shift = 0, 0
                while True:
                    byte = body[pos]
                    pos += 1
                    props_len |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                reply = json.loads(body[pos + props_len :])
                # The agent names the request in the JSON; the naive script only echoes correlation data.
                request_id = reply.get("request_id") or correlation_data(body[pos : pos + props_len])
                if not isinstance(request_id, str):
                    continue
                with self._lock:
                    sent = self._sent.pop(request_id, None)
                if sent is None:
                    continue  # not ours (an earlier run's straggler)
                error = reply.get("error")
                self.on_reply(request_id, (time.perf_counter() - sent) * 1000.0, error and error.get("code"))
        except (OSError, ProtocolError):
            return  # closed

    def send(self, request_id: str, jpeg: bytes) -> None:
        rid = request_id.encode()
        props = bytes([CORRELATION_DATA]) + struct.pack("!H", len(rid)) + rid
        variable = self.topic + varint(len(props)) + props
        header = bytes([PUBLISH << 4]) + varint(len(variable) + len(jpeg)) + variable
        with self._lock:
            self._sent[request_id] = time.perf_counter()
        self.sock.sendmsg([header, jpeg])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(bytes([0xE0, 0]))  # DISCONNECT
        self.sock.close()

    # -- load shapes ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _no_gc_pauses(self) -> Iterator[None]:
        """A full collection of the benchmark's heap takes ~15 ms: it would show up as the agent's
        latency. The generator makes no reference cycles, so the cyclic GC waits until the end."""
        gc.collect()
        gc.disable()
        try:
            yield
        finally:
            gc.enable()

    def closed_loop(
        self, frames: list[bytes], window: int, seconds: float, warmup: float
    ) -> tuple[float, Tally]:
        """Keep `window` frames in flight; count replies after `warmup` for `seconds`."""
        with self._no_gc_pauses():
            return self._closed_loop(frames, window, seconds, warmup)

    def _closed_loop(
        self, frames: list[bytes], window: int, seconds: float, warmup: float
    ) -> tuple[float, Tally]:
        tally = Tally()
        slots = threading.Semaphore(window)
        begin = time.perf_counter()
        count_from, stop = begin + warmup, begin + warmup + seconds
        prefix = run_prefix(self.name)  # fresh ids for each run, also on a reused connection

        def on_reply(_id: str, ms: float, error: str | None) -> None:
            if not error:
                tally.results += 1
            if time.perf_counter() >= count_from:
                if error:
                    tally.errors[error] = tally.errors.get(error, 0) + 1
                else:
                    tally.latencies.append(ms)
            slots.release()

        self.on_reply = on_reply
        i = 0
        while time.perf_counter() < stop:
            if not slots.acquire(timeout=60):
                raise TimeoutError("no reply for 60 s: is the agent serving?")
            self.send(f"{prefix}-c{i}", frames[i % len(frames)])
            i += 1
        elapsed = time.perf_counter() - count_from
        for _ in range(window):  # wait for the stragglers, so the next run starts clean
            slots.acquire(timeout=60)
        return len(tally.latencies) / elapsed, tally

    def open_loop(self, frames: list[bytes], rate: float, seconds: float, warmup: float = 1.0) -> Tally:
        """Frames evenly spaced at `rate` per second, whatever the answers do; waits for all.

        The first `warmup` seconds ramp the system from idle (runtime thread pools waking, queues
        filling) and are not counted, as in the closed-loop runs."""
        with self._no_gc_pauses():
            return self._open_loop(frames, rate, seconds, warmup)

    def _open_loop(self, frames: list[bytes], rate: float, seconds: float, warmup: float) -> Tally:
        tally = Tally()
        skip = int(rate * warmup)
        n = skip + int(rate * seconds)
        done = threading.Semaphore(0)
        prefix = run_prefix(self.name)

        def on_reply(request_id: str, ms: float, error: str | None) -> None:
            if not error:
                tally.results += 1
            if int(request_id.rsplit("-o", 1)[1]) >= skip:
                if error:
                    tally.errors[error] = tally.errors.get(error, 0) + 1
                else:
                    tally.latencies.append(ms)
            done.release()

        self.on_reply = on_reply
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.send(f"{prefix}-o{i}", frames[i % len(frames)])
        for _ in range(n):
            if not done.acquire(timeout=60):
                raise TimeoutError("replies missing after 60 s")
        return tally

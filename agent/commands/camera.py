"""`edge-agent camera`: frames from a real camera or video into an agent, and its answers printed.

SOURCE is a V4L2 device (`/dev/video0`, or its index `0`), an RTSP or HTTP(S) MJPEG URL, or a video
file; OpenCV's FFmpeg (or V4L2) backend decodes it. Each frame is shrunk at the source to what the
model needs (its shorter side to the model input over its crop fraction, 256 for a 224 model with a
0.875 crop), so the device never decodes a 4K JPEG, encoded as JPEG and published as a request to the
agent (docs/protocol.md, "Frames").

Back-pressure: at most `max_in_flight` frames wait for an answer. A live source is read all the time
on its own thread and only its newest frame is kept: frames that arrive while the agent is busy are
skipped and counted, never queued. A file is read frame by frame, as fast as the agent answers (or at
`fps`). A live source that stops (a camera rebooted, a stream killed) is opened again with
exponential backoff; the command goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import threading
import time
import tomllib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from agent.commands.client import InferClient, Reply
from agent.protocol.broker import redact_url
from agent.protocol.connection import Backoff, Refused

log = logging.getLogger(__name__)

# RTSP over TCP: no UDP ports to open, no packet loss on a busy Wi-Fi (the usual choice of NVRs).
os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")

DEFAULT_SHORT_SIDE = 256  # 224 / 0.875: the bundled models' input
OPEN_TIMEOUT_MS = 5000
READ_TIMEOUT_MS = 5000
BROKER_BACKOFF_S = (0.5, 10.0)  # first and longest wait before connecting to the broker again


class SourceError(Exception):
    """The source cannot be used at all (a file that does not exist): nothing to retry."""


def is_live(source: str) -> bool:
    """A camera or stream (read continuously, newest frame kept, reopened when it drops), or a file."""
    return source.isdigit() or source.startswith("/dev/video") or "://" in source


def short_side_for(models_dir: Path, model: str | None) -> int:
    """The shorter side frames are shrunk to: the model's input over its centre-crop fraction
    (models/<name>/model.toml), or 256 (the bundled models) when the model folder is not here."""
    spec = models_dir / (model or "efficientnet-lite0") / "model.toml"
    try:
        section = tomllib.loads(spec.read_text()).get("input", {})
        height, width = section["size"]
        return math.ceil(max(int(height), int(width)) / float(section.get("crop_fraction", 0.875)))
    except (OSError, ValueError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return DEFAULT_SHORT_SIDE


def shrink(frame: np.ndarray, short_side: int) -> np.ndarray:
    """Scale down (never up) so the shorter side is `short_side`; INTER_AREA keeps detail."""
    import cv2

    height, width = frame.shape[:2]
    scale = short_side / min(height, width)
    if scale >= 1.0:
        return frame
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(cv2.resize(frame, size, interpolation=cv2.INTER_AREA))


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(buf)


def open_capture(source: str) -> Any:
    """An opened cv2.VideoCapture, or None when it cannot be opened now."""
    import cv2

    timeouts = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
        OPEN_TIMEOUT_MS,
        cv2.CAP_PROP_READ_TIMEOUT_MSEC,
        READ_TIMEOUT_MS,
    ]
    if source.isdigit():
        cap = cv2.VideoCapture(int(source), cv2.CAP_V4L2)
    elif source.startswith("/dev/video"):
        cap = cv2.VideoCapture(source, cv2.CAP_V4L2)
    else:
        cap = cv2.VideoCapture(source, cv2.CAP_FFMPEG, timeouts)
    if not cap.isOpened():
        cap.release()
        return None
    return cap


@dataclass
class Counts:
    read: int = 0  # frames decoded from the source
    sent: int = 0
    answered: int = 0
    errors: int = 0  # error answers
    lost: int = 0  # no answer within the timeout
    skipped: int = 0  # live frames never sent: the agent was busy (back-pressure)
    reconnects: int = 0  # the source dropped and was opened again
    broker_reconnects: int = 0  # the broker connection was lost and made again
    retried: int = 0  # frames sent again (same request id) after no answer within the timeout

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Grabber:
    """Reads the source on its own thread. Live: keeps only the newest frame (the ones replaced
    before anyone took them are `skipped`), reopens with backoff. File: hands over each frame."""

    def __init__(
        self,
        source: str,
        counts: Counts,
        opener: Callable[[str], Any] = open_capture,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 10.0,
    ) -> None:
        self.source = source
        self.shown = redact_url(source)  # an RTSP URL may carry a password: never print it
        self.live = is_live(source)
        self.counts = counts
        self.opener = opener
        self.backoff = (backoff_min_s, backoff_max_s)
        self.ended = False  # a file read to its end, or stop() called
        self.error: str | None = None
        self._cond = threading.Condition()
        self._frame: np.ndarray | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="camera-grabber", daemon=True)

    def start(self) -> Grabber:
        if not self.live and not Path(self.source).is_file():
            raise SourceError(f"{self.shown}: no such file (give a video file, /dev/videoN or a URL)")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self.ended = True
            self._cond.notify_all()
        self._thread.join(timeout=READ_TIMEOUT_MS / 1000 + 2)

    def take(self, timeout_s: float) -> np.ndarray | None:
        """The newest frame not taken yet (waits up to `timeout_s`); None at the end or on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._frame is None and not self.ended:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            frame, self._frame = self._frame, None
            self._cond.notify_all()
            return frame

    def _put(self, frame: np.ndarray) -> None:
        with self._cond:
            if self.live:
                if self._frame is not None:
                    self.counts.skipped += 1
            else:
                while self._frame is not None and not self._stop.is_set():
                    self._cond.wait(0.5)
            self._frame = frame
            self.counts.read += 1
            self._cond.notify_all()

    def _run(self) -> None:
        delay = self.backoff[0]
        opened_once = False
        while not self._stop.is_set():
            cap = self.opener(self.source)
            if cap is None:
                if not self.live:
                    self.error = f"{self.shown}: cannot be decoded (not a video OpenCV's FFmpeg reads)"
                    break
                log.warning("cannot open %s; trying again in %.1f s", self.shown, delay)
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.backoff[1])
                continue
            if opened_once:
                self.counts.reconnects += 1
                log.warning("%s open again", self.shown)
            opened_once = True
            got_any = False
            try:
                while not self._stop.is_set():
                    ok, frame = cap.read()
                    if not ok or frame is None:
                        break
                    got_any = True
                    delay = self.backoff[0]
                    self._put(frame)
            finally:
                cap.release()
            if not self.live:
                break
            if not self._stop.is_set():
                log.warning("%s stopped sending; reopening in %.1f s", self.shown, delay)
                if self._stop.wait(delay):
                    break
                if not got_any:
                    delay = min(delay * 2, self.backoff[1])
        with self._cond:
            self.ended = True
            self._cond.notify_all()


@dataclass
class CameraRun:
    """One `edge-agent camera` session: grab, shrink, encode, publish, read answers, print."""

    source: str
    broker_url: str
    device_id: str
    model: str | None = None
    fps: float | None = None  # None: as fast as the agent answers
    frames: int | None = None  # stop after this many answers; None: until the source ends or Ctrl-C
    short_side: int = DEFAULT_SHORT_SIDE
    max_in_flight: int = 2
    timeout_s: float = 10.0
    jpeg_quality: int = 90
    tls_context: Any = None
    prefix: str = "edge"  # broker.topic_prefix of the agent's config
    protocol: str = "auto"  # broker.protocol: "5", "3.1.1" or "auto"
    pool: str | None = None  # send to this device pool (docs/pools.md) instead of `device_id`
    # A frame not answered within `timeout_s` is sent again (same request id) this many times: in a
    # pool it then reaches a live member when the one it went to died (docs/pools.md).
    retries: int = 1
    emit: Callable[[str], None] = print
    as_json: bool = False
    counts: Counts = field(default_factory=Counts)

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, url: str, device_id: str, tls: Any, prefix: str
    ) -> CameraRun:
        """The run `edge-agent camera` asks for (its options, and where its agent's config says)."""
        from agent.service.config import BUNDLED_MODELS_DIR

        short = args.short_side or short_side_for(args.models or BUNDLED_MODELS_DIR, args.model)
        return cls(
            source=args.source,
            broker_url=url,
            device_id=device_id,
            model=args.model,
            fps=args.fps,
            frames=args.frames,
            short_side=short,
            max_in_flight=args.max_in_flight,
            timeout_s=args.timeout,
            tls_context=tls,
            prefix=prefix,
            protocol=args.protocol,
            pool=args.pool,
            retries=args.retries,
            as_json=args.json,
            emit=lambda line: print(line, flush=True),
        )

    async def run(self, stop: asyncio.Event | None = None) -> Counts:
        """Until `frames` answers, the end of a file, or `stop`. The broker going away is waited out:
        the source keeps being read (live frames skipped), and publishing resumes on reconnect."""
        stop = stop or asyncio.Event()
        grabber = Grabber(self.source, self.counts).start()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._done = asyncio.Event()
        self._index = 0
        backoff = Backoff(*BROKER_BACKOFF_S)  # the agent's rule (agent.protocol.connection)
        try:
            while True:
                try:
                    async with InferClient(
                        self.broker_url,
                        self.device_id,
                        self.prefix,
                        self.tls_context,
                        self.protocol,
                        self.pool,
                    ) as client:
                        backoff.reset()
                        await self._pump(client, grabber, stop)
                        if self._in_flight:
                            await asyncio.wait(
                                self._in_flight, timeout=(self.timeout_s + 1) * (self.retries + 1)
                            )
                    break
                except aiomqtt.MqttError as exc:
                    if isinstance(exc, Refused):
                        raise  # the broker refused a frame (an ACL): it would refuse the next ones
                    if self._index == 0 and self.counts.broker_reconnects == 0:
                        raise  # never reached the broker: say so (the CLI's one-line error)
                    self.counts.broker_reconnects += 1
                    for task in list(self._in_flight):  # their answers went to the old connection
                        task.cancel()
                    delay = backoff.delay()
                    log.warning("broker connection lost (%s); reconnecting in %.1f s", exc, delay)
                    if stop.is_set():
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
        finally:
            for task in self._in_flight:
                task.cancel()
            await asyncio.to_thread(grabber.stop)
        if grabber.error:
            raise SourceError(grabber.error)
        return self.counts

    async def _pump(self, client: InferClient, grabber: Grabber, stop: asyncio.Event) -> None:
        """Take frames and publish them, at most `max_in_flight` unanswered, until done."""
        next_at = time.monotonic()
        while not stop.is_set() and not self._done.is_set():
            await self._slots.acquire()  # back-pressure: wait for an answer before reading on
            if self.fps:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at = max(next_at + 1.0 / self.fps, time.monotonic() - 1.0 / self.fps)
            frame = await asyncio.to_thread(grabber.take, 0.5)
            if frame is None or (self.frames is not None and self.counts.sent >= self.frames):
                self._slots.release()
                if frame is None and not grabber.ended:
                    continue
                return
            image = await asyncio.to_thread(self._prepare, frame)
            self._index += 1
            request_id = uuid.uuid4().hex
            try:
                future = await client.send(image, self.model, request_id)
            except aiomqtt.MqttError:
                self._slots.release()
                self.counts.lost += 1  # taken from the source, never published
                raise
            self.counts.sent += 1
            resend = functools.partial(client.send, image, self.model, request_id)
            task = asyncio.create_task(self._answer(self._index, future, resend, self._slots, self._done))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    def _prepare(self, frame: np.ndarray) -> bytes:
        return encode_jpeg(shrink(frame, self.short_side), self.jpeg_quality)

    async def _answer(
        self,
        index: int,
        future: asyncio.Future[Reply],
        resend: Callable[[], Awaitable[asyncio.Future[Reply]]],
        slots: asyncio.Semaphore,
        done: asyncio.Event,
    ) -> None:
        reply: Reply | None = None
        try:
            for attempt in range(self.retries + 1):
                try:
                    reply = await asyncio.wait_for(future, self.timeout_s)
                    break
                except TimeoutError:
                    if attempt == self.retries:
                        raise
                    self.counts.retried += 1
                    future = await resend()
        except (TimeoutError, asyncio.CancelledError, aiomqtt.MqttError):  # no answer, or connection gone
            self.counts.lost += 1
        finally:
            slots.release()
        if reply is not None:
            self.counts.answered += 1
            self.counts.errors += 0 if reply.ok else 1
        self.emit(self._line(index, reply))
        if self.frames is not None and self.counts.answered + self.counts.lost >= self.frames:
            done.set()

    def _line(self, index: int, reply: Reply | None) -> str:
        if reply is None:
            if self.as_json:
                return json.dumps({"frame": index, "error": {"code": "timeout", "message": "no answer"}})
            return f"frame {index:5d}  no answer within {self.timeout_s:g} s"
        payload = reply.payload
        if self.as_json:
            return json.dumps({"frame": index, "latency_ms": round(reply.latency_ms, 2), **payload})
        if reply.ok:
            best = reply.best  # a classifier top-1 or a detector best box
            return "\n".join(  # a cascade's answer: each box with its class below
                [
                    f"frame {index:5d}  {best['label']:24s} {best['score']:6.3f}  "
                    f"{reply.latency_ms:7.1f} ms  ({payload['model']})",
                    *reply.boxes,
                ]
            )
        err = payload.get("error", {})
        return f"frame {index:5d}  error {err.get('code')}: {err.get('message')}"


def summary(counts: Counts, elapsed_s: float) -> str:
    rate = counts.answered / elapsed_s if elapsed_s > 0 else 0.0
    return (
        f"{counts.answered} answered ({counts.errors} errors, {counts.lost} without answer) of "
        f"{counts.sent} sent, {counts.read} read from the source, {counts.skipped} skipped "
        f"(agent busy), {counts.reconnects} reconnects, {counts.broker_reconnects} broker reconnects; "
        f"{rate:.1f} answers/s"
    )


def run_camera(run: CameraRun) -> Counts:
    """Run until done or Ctrl-C/SIGTERM (the answers in flight are awaited)."""
    import signal

    async def main() -> Counts:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        return await run.run(stop)

    return asyncio.run(main())

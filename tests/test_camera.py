"""`edge-agent camera`: a real video file and a real RTSP stream (GStreamer's RTSP server) classified
through a running agent; a killed stream resumes without restarting the command."""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import pytest

from agent.commands.camera import Counts, Grabber, short_side_for, shrink
from agent.devtools.local_broker import LocalBroker, free_port
from tests.conftest import CAT_CLASSES, ESPRESSO, MODELS, REPO, SAMPLES, AgentProcess
from tests.pki import make_pki

PHOTOS = [SAMPLES / f"{name}.jpg" for name in ("cat", "daisy", "espresso", "motorcycle", "palace", "rocket")]
HOLD = 5  # frames per photo in the test video


def _photo(path: Path, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(cv2.resize(cv2.imread(str(path)), size, interpolation=cv2.INTER_AREA))


@pytest.fixture
def video(tmp_path: Path) -> Path:
    """An MPEG-4 video made from the sample photos, each held for HOLD frames, at 640x480."""
    path = tmp_path / "photos.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 10.0, (640, 480))
    assert writer.isOpened()
    for photo in PHOTOS:
        frame = _photo(photo, (640, 480))
        for _ in range(HOLD):
            writer.write(frame)
    writer.release()
    return path


class Camera:
    """The real `edge-agent camera` command as a subprocess; stdout lines and stderr kept."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "camera", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=REPO,
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._cond = threading.Condition()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, into in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors)):
            threading.Thread(target=self._pump, args=(stream, into), daemon=True).start()

    def _pump(self, stream: object, into: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._cond:
                into.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not predicate()):
                    time.sleep(0.2)  # let the pumps read what the process wrote last
                    if predicate():
                        return
                    raise AssertionError(f"{what}: {self.lines[-5:]} {self.errors[-10:]}")
                self._cond.wait(min(remaining, 0.5))

    def answers(self) -> list[dict[str, object]]:
        with self._cond:
            return [json.loads(line) for line in self.lines if line.startswith("{")]

    def finish(self, timeout: float = 60.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        time.sleep(0.1)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class RtspServer:
    """GStreamer's RTSP server (tests/rtsp_server.py, Debian's python3-gi and gst-rtsp-server)."""

    def __init__(self, port: int, frames_dir: Path, fps: int = 5) -> None:
        self.args = [
            "/usr/bin/python3",
            str(REPO / "tests" / "rtsp_server.py"),
            "--port",
            str(port),
            "--frames-dir",
            str(frames_dir),
            "--fps",
            str(fps),
        ]
        self.url = f"rtsp://127.0.0.1:{port}/cam"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> RtspServer:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready" once it listens
        assert line.strip() == "ready", f"RTSP server did not start: {line}{self.proc.stdout.read()}"
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def rtsp_frames(tmp_path: Path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, photo in enumerate(PHOTOS):
        cv2.imwrite(str(folder / f"{i:03d}.jpg"), _photo(photo, (640, 480)))
    return folder


@pytest.fixture
def rtsp(rtsp_frames: Path) -> Iterator[RtspServer]:
    if not Path("/usr/bin/python3").exists():
        pytest.fail("no /usr/bin/python3: run `make deps` (python3-gi, gir1.2-gst-rtsp-server-1.0)")
    server = RtspServer(free_port(), rtsp_frames).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalBroker]:
    """One Mosquitto for the module (overrides conftest's per-test one): the camera tests share
    the agent below; the broker-restart test restarts it on the same port."""
    with LocalBroker() as b:
        yield b


@pytest.fixture(scope="module")
def _module_agent(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent for every camera test (each start loads a model); the commands under test are the
    camera's, and each test reads only its own answers."""
    agent = AgentProcess(broker, tmp_path_factory.mktemp("cam1"), "cam1").start()
    AgentProcess.running.discard(agent)  # outlives each test on purpose; stopped below
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def running_agent(_module_agent: AgentProcess) -> AgentProcess:
    _module_agent.wait_ready()  # online and ready again, whatever the test before did to the broker
    return _module_agent


def test_short_side_comes_from_the_model_folder() -> None:
    # efficientnet-lite0: 224x224 input, 0.875 centre crop -> frames shrunk to a 256-pixel short side
    assert short_side_for(MODELS, "efficientnet-lite0") == 256
    assert short_side_for(MODELS, "efficientnet-lite1") == 275  # 240 / 0.875 = 274.3, rounded up
    frame = _photo(PHOTOS[0], (1920, 1080))
    assert shrink(frame, 256).shape == (256, 455, 3)
    small = _photo(PHOTOS[0], (320, 200))
    assert shrink(small, 256).shape == small.shape  # never scaled up


def test_video_file_is_classified_through_the_agent(
    video: Path, running_agent: AgentProcess, broker: LocalBroker
) -> None:
    cam = Camera([str(video), "--broker", broker.url, "--device-id", "cam1", "--frames", "30", "--json"])
    try:
        assert cam.finish() == 0, cam.errors
    finally:
        cam.kill()
    answers = cam.answers()
    assert len(answers) == 30
    assert sorted(int(a["frame"]) for a in answers) == list(range(1, 31))  # type: ignore[call-overload]
    top1 = {int(a["frame"]): a["top"][0]["index"] for a in answers}  # type: ignore[call-overload,index]
    cat_frames = [top1[i] for i in range(1, HOLD + 1)]
    espresso_frames = [top1[i] for i in range(2 * HOLD + 1, 3 * HOLD + 1)]
    assert all(idx in CAT_CLASSES for idx in cat_frames), cat_frames
    assert all(idx == ESPRESSO for idx in espresso_frames), espresso_frames
    assert "30 answered (0 errors, 0 without answer) of 30 sent" in cam.errors[-1]


def test_plain_output_prints_label_score_latency(
    video: Path, running_agent: AgentProcess, broker: LocalBroker
) -> None:
    cam = Camera([str(video), "--broker", broker.url, "--device-id", "cam1", "--frames", "3"])
    try:
        assert cam.finish() == 0, cam.errors
    finally:
        cam.kill()
    pattern = re.compile(r"^frame +\d+  .+ +0\.\d{3} +\d+\.\d ms  \(efficientnet-lite0\)$")
    assert len(cam.lines) == 3 and all(pattern.match(line) for line in cam.lines), cam.lines


def test_missing_file_is_a_clear_error(broker: LocalBroker, tmp_path: Path) -> None:
    cam = Camera([str(tmp_path / "nope.mp4"), "--broker", broker.url, "--device-id", "cam1"])
    assert cam.finish() == 2
    assert any("no such file" in line for line in cam.errors), cam.errors


def test_rtsp_stream_killed_and_restarted_resumes(
    rtsp: RtspServer, running_agent: AgentProcess, broker: LocalBroker
) -> None:
    cam = Camera([rtsp.url, "--broker", broker.url, "--device-id", "cam1", "--frames", "16", "--json"])
    try:
        cam.wait(lambda: len(cam.lines) >= 4, "first answers from the stream")
        rtsp.kill()
        cam.wait(lambda: any("stopped sending" in e for e in cam.errors), "the drop noticed")
        before = len(cam.answers())
        rtsp.start()
        cam.wait(lambda: any("open again" in e for e in cam.errors), "the stream reopened")
        assert cam.finish() == 0, cam.errors
    finally:
        cam.kill()
    answers = cam.answers()
    assert len(answers) == 16 and before < 16
    labels = {a["top"][0]["index"] for a in answers}  # type: ignore[index]
    assert labels & CAT_CLASSES or ESPRESSO in labels, labels  # real photos, recognised
    summary = cam.errors[-1]
    assert "16 answered (0 errors, 0 without answer)" in summary and "1 reconnects" in summary, summary


def test_live_source_skips_frames_instead_of_queueing(
    rtsp: RtspServer, running_agent: AgentProcess, broker: LocalBroker
) -> None:
    # The stream sends 5 frames/s; asking for 1/s means the frames in between are skipped, counted.
    cam = Camera([rtsp.url, "--broker", broker.url, "--device-id", "cam1", "--frames", "4", "--fps", "1"])
    try:
        assert cam.finish() == 0, cam.errors
    finally:
        cam.kill()
    found = re.search(r"of (\d+) sent, (\d+) read from the source, (\d+) skipped", cam.errors[-1])
    assert found, cam.errors
    sent, read, skipped = (int(g) for g in found.groups())
    assert sent == 4 and skipped > 0 and read >= sent + skipped


class MjpegHandler(http.server.BaseHTTPRequestHandler):
    """An IP camera's MJPEG endpoint: multipart/x-mixed-replace JPEGs, 10 a second, until the client
    goes (what phone camera apps and most cheap IP cameras serve on /video)."""

    frames: ClassVar[list[bytes]] = []

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        try:
            for i in range(10_000):
                jpeg = self.frames[i % len(self.frames)]
                head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                self.wfile.write(head.encode() + jpeg + b"\r\n")
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *_args: object) -> None:
        pass


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_http_mjpeg_stream_is_classified(
    scheme: str, running_agent: AgentProcess, broker: LocalBroker, tmp_path: Path
) -> None:
    MjpegHandler.frames = [
        bytes(cv2.imencode(".jpg", _photo(SAMPLES / name, (640, 480)))[1])
        for name in ("cat.jpg", "espresso.jpg")
    ]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), MjpegHandler)
    server.daemon_threads = True
    if scheme == "https":  # a camera with its own certificate (FFmpeg does not verify it)
        pki = make_pki(tmp_path / "pki")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki["server_cert"], pki["server_key"])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"{scheme}://127.0.0.1:{server.server_address[1]}/video"
    cam = Camera([url, "--broker", broker.url, "--device-id", "cam1", "--frames", "6", "--json"])
    try:
        assert cam.finish() == 0, cam.errors
    finally:
        cam.kill()
        server.shutdown()
    labels = {a["top"][0]["index"] for a in cam.answers()}  # type: ignore[index]
    assert len(cam.answers()) == 6 and labels & CAT_CLASSES and ESPRESSO in labels, labels


def test_grabber_keeps_only_the_newest_live_frame() -> None:
    """The live path's back-pressure without a network: a source that yields numbered frames."""

    class Numbers:
        def __init__(self) -> None:
            self.n = 0

        def read(self) -> tuple[bool, np.ndarray | None]:
            self.n += 1
            time.sleep(0.002)
            return (self.n <= 50, np.full((2, 2, 3), self.n, np.uint8))

        def release(self) -> None:
            pass

    counts = Counts()
    opened: list[Numbers] = []

    def opener(_source: str) -> Numbers | None:
        if opened:
            return None
        opened.append(Numbers())
        return opened[-1]

    grabber = Grabber("rtsp://example.invalid/x", counts, opener=opener, backoff_min_s=5).start()
    try:
        deadline = time.monotonic() + 10
        while counts.read < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        frame = grabber.take(1.0)
    finally:
        grabber.stop()
    assert frame is not None and int(frame[0, 0, 0]) == 50  # the newest
    assert counts.read == 50 and counts.skipped == 49  # the others were replaced, counted


def test_broker_restart_is_waited_out(
    rtsp: RtspServer, running_agent: AgentProcess, broker: LocalBroker
) -> None:
    cam = Camera([rtsp.url, "--broker", broker.url, "--device-id", "cam1", "--frames", "20", "--json"])
    try:
        cam.wait(lambda: len(cam.answers()) >= 3, "first answers")
        broker.restart()
        cam.wait(lambda: any("broker connection lost" in e for e in cam.errors), "the lost broker noticed")
        before = max(int(a["frame"]) for a in cam.answers())  # type: ignore[call-overload]
        cam.finish(timeout=90)
    finally:
        cam.kill()
    after = [a for a in cam.answers() if int(a["frame"]) > before and "top" in a]  # type: ignore[call-overload]
    assert after, cam.errors  # answers again, over the new connection, without a restart
    found = re.search(r"(\d+) answered .* (\d+) broker reconnects", cam.errors[-1])
    assert found and int(found.group(2)) >= 1, cam.errors


def test_a_camera_password_is_never_logged(caplog) -> None:
    """An RTSP URL often carries the camera's password: log lines show it as ***."""
    caplog.set_level(logging.WARNING, logger="agent.commands.camera")
    grabber = Grabber("rtsp://admin:s3cretpw@127.0.0.1:1/stream", Counts(), opener=lambda _s: None).start()
    try:
        deadline = time.monotonic() + 10
        while (
            not any("cannot open" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline
        ):
            time.sleep(0.01)
    finally:
        grabber.stop()
    assert "cannot open rtsp://admin:***@127.0.0.1:1/stream" in caplog.text
    assert "s3cretpw" not in caplog.text

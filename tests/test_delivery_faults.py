"""Model delivery refuses what it cannot trust and survives a broken download (docs/fleet.md).

The manifest checks are pure; the downloads run against a real HTTP server on loopback that can
cut a connection halfway, send more than it announced, or serve altered bytes. Nothing refused ever
appears in the repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.delivery import DeliveryProgress, ModelDelivery
from agent.protocol.signing import generate_keypair, load_private_key, load_public_keys, sign
from agent.service.config import ModelsConfig
from agent.service.delivery import Deliverer, DeliveryError, check_manifest
from agent.service.model_repo import ModelRepository
from tests.conftest import MODELS
from tests.pki import make_pki

NAME = "efficientnet-lite0"


class Files(http.server.ThreadingHTTPServer):
    """Serves `files` by name; `cut` names a file whose first response stops halfway; `extra` adds
    bytes past the real end (no Content-Length); `seen` keeps each request's Range header."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.extra: set[str] = set()
        self.seen: list[tuple[str, str | None]] = []

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client hanging up mid-file is what some tests provoke: not worth a traceback."""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Files

    def log_message(self, *_: Any) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        data = self.server.files.get(name)
        self.server.seen.append((name, self.headers.get("Range")))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if name in self.server.extra:
            body += b"\0" * 4096
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in self.server.cut:
            self.server.cut.discard(name)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the console went away mid-file
            return
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[Files]:
    srv = Files()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def publish_version(server: Files, version: str, label_prefix: str = "") -> dict[str, Any]:
    """The bundled classifier as `version`, served by `server`; returns the manifest dict."""
    files = {
        "model.toml": (MODELS / NAME / "model.toml")
        .read_text()
        .replace('version = "1.0.0"', f'version = "{version}"')
        .encode(),
        "model.onnx": (MODELS / NAME / "model.onnx").read_bytes(),
        "labels.txt": "".join(
            f"{label_prefix}{x}\n" for x in (MODELS / NAME / "labels.txt").read_text().split("\n") if x
        ).encode(),
    }
    artifacts = []
    for name, data in files.items():
        key = f"{version}-{name}"
        server.files[key] = data
        artifacts.append(
            {
                "name": name,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "url": f"{server.base}/{key}",
            }
        )
    return {"model": NAME, "version": version, "artifacts": artifacts}


class Harness:
    def __init__(self, tmp: Path, server: Files | None, **settings: Any) -> None:
        if server is not None:
            settings.setdefault("console_url", server.base)
        self.settings = ModelsConfig(**settings)
        self.repo = ModelRepository(MODELS, tmp / "versions")
        self.reports: list[DeliveryProgress] = []
        self.placed: set[tuple[str, str]] = set()
        self.deliverer = Deliverer(
            self.settings, self.repo, None, 3600.0, lambda p, _a: self.reports.append(p), lambda: self.placed
        )

    def deliver(self, doc: dict[str, Any]) -> DeliveryProgress:
        return asyncio.run(self.deliverer.deliver(ModelDelivery.model_validate(doc)))


def test_a_delivery_installs_whole_and_resumes_a_broken_download(tmp_path, server):
    h = Harness(tmp_path, server)
    doc = publish_version(server, "2.0.0", "v2 ")
    server.cut.add("2.0.0-model.onnx")
    outcome = h.deliver(doc)
    assert outcome.state == "installed", outcome
    assert h.repo.load(NAME).labels[967] == "v2 espresso"  # the newest version serves by default
    ranges = [r for n, r in server.seen if n == "2.0.0-model.onnx"]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes="), ranges
    assert outcome.bytes_done >= outcome.bytes_total
    assert not (h.repo.versions_root / ".incoming" / f"{NAME}@2.0.0").exists()


def test_a_tampered_artifact_is_refused_and_nothing_installs(tmp_path, server):
    h = Harness(tmp_path, server)
    doc = publish_version(server, "2.0.0")
    data = bytearray(server.files["2.0.0-model.onnx"])
    data[-100] ^= 0xFF
    server.files["2.0.0-model.onnx"] = bytes(data)
    outcome = h.deliver(doc)
    assert outcome.state == "failed" and "tampered" in (outcome.error or ""), outcome
    assert list(h.repo.versions(NAME)) == ["1.0.0"]


def test_an_artifact_larger_than_announced_is_cut_off(tmp_path, server):
    h = Harness(tmp_path, server)
    doc = publish_version(server, "2.0.0")
    server.extra.add("2.0.0-labels.txt")
    outcome = h.deliver(doc)
    assert outcome.state == "failed" and "larger than" in (outcome.error or ""), outcome
    assert list(h.repo.versions(NAME)) == ["1.0.0"]


def test_not_enough_disk_is_refused_before_downloading(tmp_path, server):
    h = Harness(tmp_path, server, min_free_mb=shutil.disk_usage(tmp_path).free / 2**20 + 10)
    outcome = h.deliver(publish_version(server, "2.0.0"))
    assert outcome.state == "failed" and "not enough disk" in (outcome.error or ""), outcome
    assert server.seen == []  # nothing was fetched


def test_files_that_do_not_make_a_model_are_not_installed(tmp_path, server):
    h = Harness(tmp_path, server)
    doc = publish_version(server, "2.0.0")
    doc["version"] = "3.0.0"  # the model.toml inside says 2.0.0
    outcome = h.deliver(doc)
    assert outcome.state == "failed" and "version" in (outcome.error or ""), outcome
    assert list(h.repo.versions(NAME)) == ["1.0.0"]


def test_old_versions_are_removed_beyond_keep_versions(tmp_path, server):
    h = Harness(tmp_path, server, keep_versions=1)
    for version in ("2.0.0", "3.0.0"):
        assert h.deliver(publish_version(server, version)).state == "installed"
    h.placed = {(NAME, "2.0.0")}  # placed: kept whatever its age
    assert h.deliver(publish_version(server, "4.0.0")).state == "installed"
    assert list(h.repo.versions(NAME)) == ["4.0.0", "3.0.0", "2.0.0", "1.0.0"]
    h.placed = set()
    assert h.deliver(publish_version(server, "5.0.0")).state == "installed"
    # newest (5), one previous (4); 3 and 2 removed; models_dir's 1.0.0 is never removed
    assert list(h.repo.versions(NAME)) == ["5.0.0", "4.0.0", "1.0.0"]


def test_two_deliveries_of_one_version_run_once(tmp_path, server):
    h = Harness(tmp_path, server)
    payload = ModelDelivery.model_validate(publish_version(server, "2.0.0")).model_dump_json().encode()

    async def twice() -> None:
        h.deliverer.submit(payload)
        h.deliverer.submit(payload)  # arrives while the first runs: ignored
        assert len(h.deliverer._running) == 1
        await asyncio.gather(*h.deliverer._running.values())

    asyncio.run(twice())
    assert [r.state for r in h.reports if r.state != "downloading" or r.bytes_done == 0] == [
        "downloading",
        "installed",
    ]
    assert len([n for n, _ in server.seen if n == "2.0.0-model.onnx"]) == 1


# -- the manifest, before anything is fetched ------------------------------------------------------
def manifest(**changes: Any) -> dict[str, Any]:
    doc = {
        "model": NAME,
        "version": "2.0.0",
        "artifacts": [
            {
                "name": "model.toml",
                "size": 10,
                "sha256": "0" * 64,
                "url": "https://console.example:8443/api/blobs/x",
            }
        ],
    }
    doc.update(changes)
    return doc


SETTINGS = ModelsConfig(console_url="https://console.example:8443")


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (manifest(version=".."), "version"),
        (manifest(version="a/b"), "version"),
        (manifest(model="../etc"), "model"),
        (
            manifest(
                artifacts=[
                    {
                        "name": "../model.toml",
                        "size": 1,
                        "sha256": "0" * 64,
                        "url": "https://console.example:8443/x",
                    }
                ]
            ),
            "plain name",
        ),
        (
            manifest(
                artifacts=[
                    {
                        "name": "a/model.toml",
                        "size": 1,
                        "sha256": "0" * 64,
                        "url": "https://console.example:8443/x",
                    }
                ]
            ),
            "plain name",
        ),
        (
            manifest(
                artifacts=[
                    {"name": "model.toml", "size": 1, "sha256": "0" * 64, "url": "https://evil.example/x"}
                ]
            ),
            "not on the configured console",
        ),
        (
            manifest(
                artifacts=[
                    {
                        "name": "model.toml",
                        "size": 1,
                        "sha256": "0" * 64,
                        "url": "http://console.example:8443/x",
                    }
                ]
            ),
            "not on the configured console",  # same host, other scheme's port: refused
        ),
        (
            manifest(
                artifacts=[
                    {
                        "name": "model.toml",
                        "size": 2**40,
                        "sha256": "0" * 64,
                        "url": "https://console.example:8443/x",
                    }
                ]
            ),
            "max_artifact_mb",
        ),
    ],
)
def test_bad_manifests_are_refused_with_the_reason(doc, reason):

    with pytest.raises(DeliveryError, match=reason):
        check_manifest(json.dumps(doc).encode(), SETTINGS, None, 3600.0)


def test_signed_manifests_where_placements_are_signed(tmp_path):

    private, public = generate_keypair(tmp_path)
    keys = load_public_keys(public.read_text().strip())
    key = load_private_key(private)
    signed = sign(manifest(), key)
    assert check_manifest(json.dumps(signed).encode(), SETTINGS, keys, 3600.0).version == "2.0.0"
    with pytest.raises(DeliveryError, match="unsigned"):
        check_manifest(json.dumps(manifest()).encode(), SETTINGS, keys, 3600.0)
    altered = {**signed, "version": "2.0.1"}
    with pytest.raises(DeliveryError, match="forged or altered"):
        check_manifest(json.dumps(altered).encode(), SETTINGS, keys, 3600.0)
    old = sign(manifest(), key, valid_s=10, now=time.time() - 100)
    with pytest.raises(DeliveryError, match="expired"):
        check_manifest(json.dumps(old).encode(), SETTINGS, keys, 3600.0)


def test_without_a_console_url_no_delivery_is_taken():

    with pytest.raises(DeliveryError, match="console_url"):
        check_manifest(json.dumps(manifest()).encode(), ModelsConfig(), None, 3600.0)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 24 MB tmpfs: room for the 18 MB model when the download starts, not once it is filled."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_disk_that_fills_mid_download_fails_cleanly(small_disk, server):
    h = Harness(small_disk, server, min_free_mb=0)
    doc = publish_version(server, "2.0.0")
    filler = small_disk / "other-writer.bin"

    class Filling(dict):  # another program fills the disk as the big file starts to arrive
        def get(self, key: str, default: Any = None) -> Any:
            if key == "2.0.0-model.onnx" and not filler.exists():
                filler.write_bytes(b"\0" * (12 * 2**20))
            return super().get(key, default)

    server.files = Filling(server.files)
    outcome = h.deliver(doc)
    assert outcome.state == "failed" and "disk filled up" in (outcome.error or ""), outcome
    assert list(h.repo.versions(NAME)) == ["1.0.0"]
    assert not (small_disk / "versions" / ".incoming" / f"{NAME}@2.0.0").exists()


def test_https_with_the_consoles_ca_and_a_client_certificate(tmp_path):
    """Over HTTPS the device trusts only `ca_file` and shows its client certificate; without either
    the download is refused and nothing installs."""
    import ssl

    pki = make_pki(tmp_path / "pki", clients=("device1",))
    srv = Files()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server_cert"], pki["server_key"])
    ctx.load_verify_locations(pki["ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED  # like a TLS proxy in front of the console asking devices for one
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"https://127.0.0.1:{srv.server_address[1]}"
        doc = publish_version(srv, "2.0.0")
        for artifact in doc["artifacts"]:
            artifact["url"] = artifact["url"].replace("http://", "https://")
        tls = {"ca_file": pki["ca"], "cert_file": pki["device1_cert"], "key_file": pki["device1_key"]}
        for missing in ("cert_file", "ca_file"):
            h = Harness(tmp_path / missing, srv, **{k: v for k, v in tls.items() if k != missing})
            h.settings = h.deliverer.settings = h.settings.model_copy(update={"console_url": base})
            outcome = h.deliver(doc)
            assert outcome.state == "failed" and "download failed" in (outcome.error or ""), (
                missing,
                outcome,
            )
        h = Harness(tmp_path / "ok", srv, **tls)
        h.settings = h.deliverer.settings = h.settings.model_copy(update={"console_url": base})
        assert h.deliver(doc).state == "installed"
        assert list(h.repo.versions(NAME)) == ["2.0.0", "1.0.0"]
    finally:
        srv.shutdown()
        srv.server_close()


@contextlib.contextmanager
def caplog_of(logger: str) -> Iterator[list[str]]:
    """The messages `logger` logs inside the block (pytest's caplog is per test, this per block)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep()
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        yield lines
    finally:
        log.removeHandler(handler)


# -- a real console restarting mid-download ----------------------------------------------------------
class SlowLink:
    """A TCP relay to the console at `rate` bytes/s (a slow uplink), so a download is still under
    way when the test restarts the console. A connection made while the console is down waits for
    it to listen again, as a device's request waits on a console behind a load balancer. `served`
    counts the bytes relayed back; `requests` keeps each request's head (its Range header)."""

    def __init__(self, upstream_port: int, rate: float) -> None:
        self.upstream_port, self.rate = upstream_port, rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.served = 0
        self.requests: list[bytes] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        deadline = time.monotonic() + 90
        while True:  # the console may be restarting: wait until it listens again
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    client.close()
                    return
                time.sleep(0.05)

        def up() -> None:
            first = True
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    if first:
                        self.requests.append(data)
                        first = False
                    upstream.sendall(data)
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)

        threading.Thread(target=up, daemon=True).start()
        with contextlib.suppress(OSError):
            while data := upstream.recv(32768):
                client.sendall(data)
                with self.changed:
                    self.served += len(data)
                    self.changed.notify_all()
                time.sleep(len(data) / self.rate)  # the link's pace, not a wait for an event
        for end in (client, upstream):  # shutdown, not just close: it wakes the other thread's recv
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def wait_served(self, at_least: int, timeout: float = 60.0) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: self.served >= at_least, timeout):
                raise AssertionError(f"only {self.served} bytes relayed")

    def close(self) -> None:
        self.listener.close()


def test_a_console_restart_mid_download_is_resumed_and_installs(broker, tmp_path):
    """The console process is killed while the agent's deliverer fetches the 18 MB model from it, and
    started again: the download resumes with a Range request, every digest is checked, it installs."""
    from tests.test_console import ConsoleProcess
    from tests.test_delivery import new_version, raw, tar_of

    console = ConsoleProcess(broker.url, tmp_path).start()
    link = SlowLink(console.port, rate=16 * 2**20)
    try:
        admin = console.client("admin")
        token = admin.call("POST", "/api/tokens", {"name": "ci", "role": "admin"})[1]["token"]
        upload = tar_of(new_version(tmp_path, "2.0.0", "v2 "))
        status, entry = raw(console.base, "POST", "/api/models", upload, token)
        assert status == 201, entry
        # The manifest the console publishes (cloud_console/model_store.py), its URLs on the link.
        doc = {
            "model": NAME,
            "version": "2.0.0",
            "artifacts": [
                {**f, "url": f"{link.base}/api/blobs/{f['sha256']}"}
                for f in ({k: f[k] for k in ("name", "size", "sha256")} for f in entry["files"])
            ],
        }
        onnx = next(a for a in doc["artifacts"] if a["name"] == "model.onnx")
        h = Harness(tmp_path, server=None, console_url=link.base, token=token)

        def restart_console() -> None:
            link.wait_served(2 * 2**20)  # the big file is on its way
            assert console.proc is not None
            console.proc.kill()
            console.proc.wait(30)
            console.start()  # the same port and database

        restarter = threading.Thread(target=restart_console)
        restarter.start()
        with caplog_of("agent.service.delivery") as logged:
            outcome = h.deliver(doc)
        restarter.join(120)
        assert outcome.state == "installed", outcome
        assert any("resuming" in line for line in logged), logged
        resumed = [r for r in link.requests if onnx["sha256"].encode() in r and b"Range: bytes=" in r]
        assert resumed, [r[:200] for r in link.requests]
        assert outcome.bytes_done == outcome.bytes_total  # resumed, not fetched again from the start
        model = h.repo.load(NAME, version="2.0.0")  # digests checked again on load
        assert model.labels[967] == "v2 espresso"
    finally:
        link.close()
        assert console.stop() == 0, console.log()[-2000:]

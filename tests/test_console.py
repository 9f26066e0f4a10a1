"""The cloud console: auth, placement logic, and its JSON API against a real Mosquitto.

Devices are the fleet simulator (same payload models as the agent) or the real agent process.
The console runs as `python -m cloud_console serve`, a subprocess, as it runs in production.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import argon2
import pytest

from agent.devtools.local_broker import LocalBroker, free_port
from agent.protocol.editing import (
    DesiredPlacement,
    PlacementInvalid,
    check_against,
    move_tenants,
    next_generation,
    track,
)
from agent.protocol.schemas import (
    BackendCapability,
    Capabilities,
    PlacementStatus,
    Status,
    TenantSpec,
    TenantStatus,
)
from cloud_console import auth, cli
from cloud_console.config import ConsoleConfigError, load_console_config
from cloud_console.simulator import PROFILES, FleetSimulator, SimDevice

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parent.parent


# -- helpers shared with test_console_browser.py ---------------------------------------------------
def wait_until(fn: Callable[[], Any], what: str, timeout: float = 60.0, every: float = 0.2) -> Any:
    """Poll until `fn()` is truthy and return it (a wait with a generous cap, not a timing check)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"gave up waiting for {what}; last value: {last!r}")


class Client:
    """A cookie-keeping JSON client for the console (stdlib), as a script or a browser would be."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.csrf: str | None = None
        self.last_headers: Any = None

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.csrf:
            req.add_header("X-CSRF-Token", self.csrf)
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with self.opener.open(req, timeout=60) as res:
                self.last_headers = res.headers
                raw = res.read()
                status = res.status
        except urllib.error.HTTPError as exc:
            self.last_headers = exc.headers
            raw = exc.read()
            status = exc.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        status, data = self.call("GET", path)
        assert status == 200, (path, status, data)
        return data

    def login(self, user: str, password: str) -> Client:
        status, data = self.call("POST", "/api/login", {"username": user, "password": password})
        assert status == 200, data
        self.csrf = data["csrf_token"]
        return self

    def session_cookie(self) -> str | None:
        return next((c.value for c in self.jar if c.name == "edge_console_session"), None)


class ConsoleProcess:
    """`python -m cloud_console serve` against a broker, with demo users of known passwords."""

    def __init__(self, broker_url: str, workdir: Path, extra_args: list[str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.admin_password = "admin-pw-" + os.urandom(4).hex()
        self.viewer_password = "viewer-pw-" + os.urandom(4).hex()
        self.db = workdir / "console.db"
        self.log_path = workdir / "console.log"
        self.args = [
            sys.executable,
            "-m",
            "cloud_console",
            "serve",
            "--broker",
            broker_url,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--db",
            str(self.db),
            "--demo-users",
            f"admin={self.admin_password},viewer={self.viewer_password}",
            *(extra_args or []),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ConsoleProcess:
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"console exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                status, data = Client(self.base).call("GET", "/healthz")
            except OSError:
                return False
            return status == 200 and data["mqtt_connected"]

        wait_until(healthy, "the console to answer /healthz with MQTT connected", timeout=90)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, user: str | None = None) -> Client:
        c = Client(self.base)
        if user == "admin":
            c.login("admin", self.admin_password)
        elif user == "viewer":
            c.login("viewer", self.viewer_password)
        return c

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def device_detail(client: Client, device_id: str) -> dict[str, Any] | None:
    status, data = client.call("GET", f"/api/devices/{device_id}")
    return data if status == 200 else None


def tracking_state(
    client: Client, device_id: str, generation: int, states: set[str]
) -> dict[str, Any] | None:
    detail = device_detail(client, device_id)
    if detail is None:
        return None
    tracking = detail["tracking"]
    return tracking if tracking["generation"] == generation and tracking["state"] in states else None


# -- unit: passwords, sessions, CSRF ---------------------------------------------------------------
def test_password_hash_verifies_only_the_right_password():
    encoded = auth.hash_password("correct horse")  # the real parameters, no test-only lower cost
    # Current guidance (OWASP): argon2id with at least 19 MiB and 2 passes.
    params = argon2.extract_parameters(encoded)
    assert params.type is argon2.Type.ID and params.memory_cost >= 19 * 1024 and params.time_cost >= 2
    assert not auth.needs_upgrade(encoded)
    assert auth.verify_password("correct horse", encoded)
    assert not auth.verify_password("correct hors", encoded)
    # The scrypt hashes of earlier versions still verify, and are marked for an upgrade.
    old = auth.scrypt_hash("correct horse", n=2**10)
    assert auth.verify_password("correct horse", old) and auth.needs_upgrade(old)
    assert not auth.verify_password("correct hors", old)
    assert auth.scrypt_hash("correct horse", n=2**10) != old  # salted
    assert not auth.verify_password("x", "scrypt$garbage")
    assert not auth.verify_password("x", "$argon2id$garbage")
    assert not auth.verify_password("x", "bcrypt$1$2$3$4$5")


def test_session_cookie_rejects_tampering_expiry_and_logout():
    signer = auth.SessionSigner(b"k" * 32, max_age_s=3600)
    cookie, session = signer.issue("alice")
    assert signer.read(cookie) == session
    sig = cookie.split(".")[1]
    forged = auth._b64(json.dumps({"u": "root", "s": session.sid, "e": 9999999999}).encode())
    assert signer.read(f"{forged}.{sig}") is None
    assert signer.read(cookie[:-2] + "xx") is None
    assert auth.SessionSigner(b"other" * 8, 3600).read(cookie) is None
    expired = auth.SessionSigner(b"k" * 32, max_age_s=-10).issue("alice")[0]
    assert signer.read(expired) is None
    token = signer.csrf_token(session)
    assert signer.check_csrf(session, token)
    assert not signer.check_csrf(session, None)
    _, other = signer.issue("alice")
    assert not signer.check_csrf(other, token)  # a token belongs to one session
    signer.revoke(session)
    assert signer.read(cookie) is None


def test_a_logout_outlives_a_restart_and_reaches_other_workers(database):
    """Sessions live in the console's database (SQLite or PostgreSQL): a process started later with
    the same secret and database (a restart, or a second process) accepts the session and refuses it
    once logged out."""
    from cloud_console.db import migrate, open_engine

    engine = open_engine(database)
    migrate(engine)
    first = auth.SessionSigner(b"k" * 32, 3600, db=engine)
    other_worker = auth.SessionSigner(b"k" * 32, 3600, db=open_engine(database))
    cookie, session = first.issue("alice", auth.password_binding("scrypt$old"))
    kept, _ = first.issue("alice")
    assert other_worker.read(cookie) == session
    first.revoke(session)
    assert other_worker.read(cookie) is None
    restarted = auth.SessionSigner(b"k" * 32, 3600, db=open_engine(database))
    assert restarted.read(cookie) is None and restarted.read(kept) is not None
    # A validly signed cookie whose session the database never issued is refused (a database reset,
    # or a secret that leaked without the database).
    stateless = auth.SessionSigner(b"k" * 32, 3600).issue("alice")[0]
    assert restarted.read(stateless) is None
    # The cookie carries a digest of the password hash at login; a changed password ends it.
    assert session.key == auth.password_binding("scrypt$old") != auth.password_binding("scrypt$new")
    assert "scrypt" not in cookie


def test_config_file_users_and_errors(tmp_path):
    good = tmp_path / "console.toml"
    hashed = auth.scrypt_hash("s3cret-pass", n=2**10)  # an old-format hash is still a valid config
    good.write_text(
        f'topic_prefix = "edge"\n[web]\nlisten = "127.0.0.1:9000"\n'
        f'[[users]]\nname = "ops"\npassword_hash = "{hashed}"\nrole = "admin"\n'
    )
    config = load_console_config(good)
    assert config.users[0].role == "admin"
    assert auth.verify_password("s3cret-pass", config.users[0].password_hash)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[users]]\nname = "a"\npassword_hash = "plain"\n')
    with pytest.raises(ConsoleConfigError, match="password_hash"):
        load_console_config(bad)
    twice = tmp_path / "twice.toml"
    user = f'[[users]]\nname = "a"\npassword_hash = "{hashed}"\n'
    twice.write_text(user + user)
    with pytest.raises(ConsoleConfigError, match="twice"):
        load_console_config(twice)


def test_cli_hash_password_and_refusal_without_users(tmp_path, capsys, monkeypatch):
    out = subprocess.run(
        [sys.executable, "-m", "cloud_console", "hash-password", "--stdin"],
        input="a-long-password\n",
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.strip()
    assert auth.verify_password("a-long-password", out)
    assert cli.main(["serve", "--broker", "mqtt://127.0.0.1:1", "--db", str(tmp_path / "c.db")]) == 2
    assert "no users" in capsys.readouterr().err


# -- unit: placement logic ---------------------------------------------------------------------------
CAPS = Capabilities(
    backends={
        "onnxruntime": BackendCapability(available=True, devices=["cpu"]),
        "openvino": BackendCapability(available=True, devices=["CPU", "AUTO"]),
        "tflite": BackendCapability(available=False, reason="not installed"),
    },
    models=["efficientnet-lite0", "efficientnet-lite1"],
)


def status_with(applied: int, tenants: list[TenantStatus], errors: list[str] | None = None) -> Status:
    return Status(
        online=True,
        capabilities=CAPS,
        placement=PlacementStatus(generation=applied, applied_generation=applied, tenants=tenants),
        errors=errors or [],
    )


def test_tracking_follows_the_device_status():
    spec = TenantSpec(model="efficientnet-lite0", backend="openvino", device="CPU")
    desired = DesiredPlacement(5, [spec], published_at=time.time())
    old = TenantStatus(model="efficientnet-lite0", backend="onnxruntime", device="cpu", state="ready")
    assert track(desired, status_with(4, [old])).state == "pending"
    loading = TenantStatus(**spec.model_dump(), state="loading")
    assert track(desired, status_with(5, [old, loading])).state == "pending"
    ready = TenantStatus(**spec.model_dump(), state="ready")
    assert track(desired, status_with(5, [ready])).state == "applied"
    failed = TenantStatus(**spec.model_dump(), state="failed", error="no GPU")
    outcome = track(desired, status_with(5, [old, failed]))
    assert (outcome.state, outcome.reason) == ("failed", "efficientnet-lite0: no GPU")
    refused = status_with(
        4, [old], ["2026-01-01T00:00:00Z placement generation 5 refused: unknown backend 'auto'"]
    )
    outcome = track(desired, refused)
    assert (outcome.state, outcome.reason) == ("refused", "unknown backend 'auto'")
    # A refusal of another generation is not this one's.
    other = status_with(4, [old], ["2026-01-01T00:00:00Z placement generation 3 refused: older"])
    assert track(desired, other).state == "pending"
    assert track(desired, status_with(6, [ready])).state == "superseded"
    assert track(None, status_with(6, [ready])).state == "none"


def test_next_generation_is_above_applied_and_desired():
    ready = TenantStatus(model="efficientnet-lite0", backend="onnxruntime", device="cpu", state="ready")
    assert next_generation(status_with(0, [ready]), None) == 1
    assert next_generation(status_with(7, [ready]), None) == 8
    assert next_generation(status_with(7, [ready]), DesiredPlacement(9, [])) == 10
    assert next_generation(None, None) == 1


def test_placement_is_checked_against_the_device_capabilities():
    ok = check_against(CAPS, [TenantSpec(model="efficientnet-lite0", backend="openvino", device="cpu")])
    assert ok[0].device == "CPU"  # the backend's own spelling
    cases = [
        (TenantSpec(model="efficientnet-lite2", backend="openvino", device="CPU"), "not on this device"),
        (TenantSpec(model="efficientnet-lite0", backend="tensorrt", device="cuda:0"), "not known"),
        (TenantSpec(model="efficientnet-lite0", backend="tflite", device="cpu"), "unavailable"),
        (TenantSpec(model="efficientnet-lite0", backend="openvino", device="GPU"), "no device 'GPU'"),
    ]
    for spec, message in cases:
        with pytest.raises(PlacementInvalid, match=message):
            check_against(CAPS, [spec])
    with pytest.raises(PlacementInvalid, match="capabilities"):
        check_against(None, [])


def test_move_replaces_only_the_named_model_on_the_named_backend():
    tenants = [
        TenantSpec(model="efficientnet-lite0", backend="onnxruntime", device="cpu", instances=2),
        TenantSpec(model="efficientnet-lite1", backend="onnxruntime", device="cpu"),
    ]
    moved = move_tenants(tenants, CAPS, "efficientnet-lite0", "onnxruntime", "openvino", None)
    assert moved is not None
    assert [(t.model, t.backend, t.device, t.instances) for t in moved] == [
        ("efficientnet-lite0", "openvino", "CPU", 2),
        ("efficientnet-lite1", "onnxruntime", "cpu", 1),
    ]
    assert move_tenants(tenants, CAPS, "efficientnet-lite0", "openvino", "onnxruntime", None) is None
    with pytest.raises(PlacementInvalid, match="unavailable"):
        move_tenants(tenants, CAPS, "efficientnet-lite0", "onnxruntime", "tflite", None)


def test_simulated_device_applies_and_refuses_like_the_agent():
    import random

    device = SimDevice("sim-x", PROFILES[0], random.Random(0))
    doc = {
        "generation": 3,
        "tenants": [{"model": "efficientnet-lite0", "backend": "openvino", "device": "CPU"}],
    }
    device.apply(json.dumps(doc).encode(), now=100.0)
    status = device.status()
    assert status.placement is not None
    assert status.placement.applied_generation == 0
    assert {t.state for t in status.placement.tenants} == {"ready", "loading"}
    assert device.tick(now=1000.0)
    status = device.status()
    assert status.placement is not None
    assert status.placement.applied_generation == 3
    assert [(t.backend, t.state) for t in status.placement.tenants] == [("openvino", "ready")]
    device.apply(json.dumps({**doc, "generation": 2}).encode(), now=1001.0)
    assert "placement generation 2 refused: generation 2 is older" in device.errors[-1]
    auto = {
        "generation": 4,
        "tenants": [{"model": "efficientnet-lite0", "backend": "auto", "device": "auto"}],
    }
    device.apply(json.dumps(auto).encode(), now=1002.0)
    assert "placement generation 4 refused: unknown backend 'auto'" in device.errors[-1]
    device.apply(b'{"generation": "x"}', now=1003.0)
    assert "placement refused:" in device.errors[-1]
    telemetry = device.telemetry(1.0)
    assert telemetry.tenants[0].backend == "openvino"


# -- API against a real broker, with simulated devices -----------------------------------------------
SIM_DEVICES = 12  # profiles rotate: 0 x86-openvino, 1 jetson, 2 rpi-coral, 3 gpu-server, 4 x86, ...


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ConsoleProcess, FleetSimulator]]:
    workdir = tmp_path_factory.mktemp("console")
    with LocalBroker() as broker:
        sim = FleetSimulator(broker.host, broker.port, SIM_DEVICES, interval_s=0.5, per_connection=5)
        sim.start()
        console = ConsoleProcess(broker.url, workdir).start()
        try:
            admin = console.client("admin")
            wait_until(
                lambda: admin.get("/api/devices")["stats"]["online"] == SIM_DEVICES, "all simulated devices"
            )
            yield console, sim
        finally:
            console.stop()
            sim.stop()


def test_pages_and_api_need_login(fleet):
    console, _ = fleet
    anonymous = console.client()
    status, _ = anonymous.call("GET", "/api/devices")
    assert status == 401
    req = urllib.request.Request(console.base + "/")
    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as info:
        opener.open(req, timeout=30)
    assert info.value.code == 303
    assert info.value.headers["location"].startswith("/login")
    status, _ = anonymous.call("POST", "/api/login", {"username": "admin", "password": "wrong"})
    assert status == 401
    # The HTML form (urlencoded): back to the form with an error, or on to the page asked for.
    for password, location in [
        ("wrong", "/login?error=1&next=/devices/sim-0001"),
        (console.admin_password, None),
    ]:
        form = urllib.parse.urlencode(
            {"username": "admin", "password": password, "next": "/devices/sim-0001"}
        )
        req = urllib.request.Request(console.base + "/login", data=form.encode(), method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            opener.open(req, timeout=30)
        assert info.value.code == 303
        assert info.value.headers["location"] == (location or "/devices/sim-0001")
        assert ("edge_console_session=" in (info.value.headers["set-cookie"] or "")) == (location is None)
    status, _ = anonymous.call("POST", "/api/login", {"username": "nobody", "password": "wrong"})
    assert status == 401


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_login_sets_a_hardened_session_cookie(fleet):
    console, _ = fleet
    client = console.client("admin")
    cookie = client.last_headers["set-cookie"]
    assert "edge_console_session=" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    session = client.get("/api/session")
    assert (session["user"], session["role"]) == ("admin", "admin")
    # The page carries no inline script and a strict CSP.
    status, html = client.call("GET", "/")
    assert status == 200
    assert "default-src 'self'" in client.last_headers["content-security-policy"]
    assert "<script>" not in html and "cdn" not in html.lower()


def test_fleet_api_lists_filters_and_sorts(fleet):
    console, _ = fleet
    client = console.client("viewer")
    data = client.get("/api/devices")
    assert data["total"] == SIM_DEVICES
    row = next(d for d in data["devices"] if d["device_id"] == "sim-0002")
    assert row["online"] and row["tenants"][0]["backend"] == "edgetpu"
    wait_until(
        lambda: client.get("/api/devices?q=sim-0002")["devices"][0]["fps"] > 0, "telemetry of sim-0002"
    )
    coral = client.get("/api/devices?q=edgetpu")["devices"]
    assert {d["device_id"] for d in coral} == {"sim-0002", "sim-0006", "sim-0010"}
    by_fps = client.get("/api/devices?sort=fps&desc=true")["devices"]
    assert [d["fps"] for d in by_fps] == sorted((d["fps"] for d in by_fps), reverse=True)
    assert client.get("/api/devices?online=false")["devices"] == []


def test_csrf_token_is_required_for_every_change(fleet):
    console, _ = fleet
    admin = console.client("admin")
    body = {"tenants": [{"model": "efficientnet-lite0", "backend": "onnxruntime", "device": "cpu"}]}
    good_token = admin.csrf
    admin.csrf = None
    status, data = admin.call("PUT", "/api/devices/sim-0004/placement", body)
    assert (status, data["detail"]) == (403, "CSRF token missing or invalid")
    admin.csrf = "forged"
    assert admin.call("POST", "/api/devices/sim-0004/auto-place")[0] == 403
    admin.csrf = console.client("admin").csrf  # another session's token
    assert admin.call("POST", "/api/logout")[0] == 403
    admin.csrf = good_token
    status, _ = admin.call("PUT", "/api/devices/sim-0004/placement", body, {"Origin": "http://evil.example"})
    assert status == 403
    status, data = admin.call("PUT", "/api/devices/sim-0004/placement", body)
    assert status == 200, data


def test_viewer_may_look_but_not_change_placement(fleet):
    console, _ = fleet
    viewer = console.client("viewer")
    assert viewer.get("/api/devices/sim-0009")["summary"]["device_id"] == "sim-0009"
    body = {"tenants": [{"model": "efficientnet-lite0", "backend": "openvino", "device": "CPU"}]}
    status, data = viewer.call("PUT", "/api/devices/sim-0009/placement", body)
    assert status == 403 and "admin" in data["detail"]
    assert viewer.call("POST", "/api/devices/sim-0009/auto-place")[0] == 403
    move = {"model": "efficientnet-lite0", "from_backend": "onnxruntime", "to_backend": "openvino"}
    assert viewer.call("POST", "/api/fleet/move", move)[0] == 403
    assert viewer.get("/api/devices/sim-0009")["desired"] is None


def test_placement_edit_is_published_and_applied(fleet):
    console, sim = fleet
    admin = console.client("admin")
    before = admin.get("/api/devices/sim-0000")
    body = {
        "tenants": [
            {"model": "efficientnet-lite0", "backend": "openvino", "device": "cpu", "instances": 2},
            {"model": "efficientnet-lite2", "backend": "openvino", "device": "GPU"},
        ]
    }
    status, data = admin.call("PUT", "/api/devices/sim-0000/placement", body)
    assert status == 200, data
    gen = data["generation"]
    assert gen == before["next_generation"]
    assert data["document"]["tenants"][0]["device"] == "CPU"
    tracking = wait_until(lambda: tracking_state(admin, "sim-0000", gen, {"applied"}), "placement applied")
    assert tracking["state"] == "applied"
    tenants = admin.get("/api/devices/sim-0000")["summary"]["tenants"]
    assert {(t["model"], t["backend"], t["device"], t["instances"]) for t in tenants} == {
        ("efficientnet-lite0", "openvino", "CPU", 2),
        ("efficientnet-lite2", "openvino", "GPU", 1),
    }
    # The device itself (not the console) says so.
    assert sim.device_map["sim-0000"].applied_generation == gen
    history = wait_until(lambda: admin.get("/api/devices/sim-0000/placements")["placements"], "audit log")
    assert (history[0]["generation"], history[0]["user"], history[0]["action"]) == (gen, "admin", "edit")
    # The next edit goes above it.
    status, data = admin.call("PUT", "/api/devices/sim-0000/placement", body)
    assert data["generation"] == gen + 1


def test_placement_the_device_cannot_run_is_refused_by_the_console(fleet):
    console, _ = fleet
    admin = console.client("admin")
    for tenant, message in [
        ({"model": "efficientnet-lite0", "backend": "openvino", "device": "CPU"}, "unavailable"),  # jetson
        ({"model": "efficientnet-lite0", "backend": "onnxruntime", "device": "cuda:7"}, "no device"),
        ({"model": "resnet-9000", "backend": "onnxruntime", "device": "cpu"}, "not on this device"),
    ]:
        status, data = admin.call("PUT", "/api/devices/sim-0001/placement", {"tenants": [tenant]})
        assert status == 422 and message in data["detail"], data
    status, _ = admin.call("PUT", "/api/devices/sim-0001/placement", {"tenants": [{"model": "../x"}]})
    assert status == 422
    chosen = {"generation": 99, "tenants": [{"model": "efficientnet-lite0"}]}  # the console picks it
    assert admin.call("PUT", "/api/devices/sim-0001/placement", chosen)[0] == 422
    assert admin.call("PUT", "/api/devices/nope/placement", {"tenants": []})[0] == 404
    assert admin.get("/api/devices/sim-0001")["desired"] is None


def test_auto_place_refusal_is_reported(fleet):
    console, _ = fleet
    admin = console.client("admin")
    status, data = admin.call("POST", "/api/devices/sim-0005/auto-place")
    assert status == 200, data
    assert {t["backend"] for t in data["document"]["tenants"]} == {"auto"}
    tracking = wait_until(
        lambda: tracking_state(admin, "sim-0005", data["generation"], {"refused"}), "auto-place refused"
    )
    assert "unknown backend 'auto'" in tracking["reason"]
    row = admin.get("/api/devices?q=sim-0005")["devices"][0]
    assert row["placement"]["state"] == "refused"


def test_fleet_wide_move(fleet):
    console, sim = fleet
    admin = console.client("admin")
    move = {
        "model": "efficientnet-lite2",
        "from_backend": "tensorrt",
        "to_backend": "torch",
        "to_device": "cuda:1",
    }
    status, data = admin.call("POST", "/api/fleet/move", move)
    assert status == 200, data
    gpu_servers = {"sim-0003", "sim-0007", "sim-0011"}
    assert {p["device_id"] for p in data["published"]} == gpu_servers
    assert data["skipped"] == []
    for device_id in gpu_servers:
        gen = next(p["generation"] for p in data["published"] if p["device_id"] == device_id)
        wait_until(
            lambda d=device_id, g=gen: tracking_state(admin, d, g, {"applied"}), f"{device_id} applied"
        )
        tenants = sim.device_map[device_id].tenants
        assert (tenants["efficientnet-lite2"].spec.backend, tenants["efficientnet-lite2"].spec.device) == (
            "torch",
            "cuda:1",
        )
        assert tenants["efficientnet-lite0"].spec.backend == "onnxruntime"  # untouched
    # Devices that cannot take the target are skipped with the reason, not sent a doomed placement.
    status, data = admin.call(
        "POST",
        "/api/fleet/move",
        {"model": "efficientnet-lite0", "from_backend": "edgetpu", "to_backend": "openvino"},
    )
    assert data["published"] == []
    assert {s["device_id"] for s in data["skipped"]} == {"sim-0002", "sim-0006", "sim-0010"}
    assert all("unavailable" in s["reason"] for s in data["skipped"])
    # A typo (or a move to where it already is) is not a silent success.
    typo = {"model": "efficientnet-lite9", "from_backend": "tensorrt", "to_backend": "torch"}
    status, data = admin.call("POST", "/api/fleet/move", typo)
    assert status == 404 and "no device runs efficientnet-lite9" in str(data), data


def test_live_events_stream_telemetry(fleet):
    console, _ = fleet
    admin = console.client("admin")
    conn = http.client.HTTPConnection("127.0.0.1", console.port, timeout=60)
    conn.request(
        "GET",
        "/api/events?device=sim-0008",
        headers={"Cookie": f"edge_console_session={admin.session_cookie()}"},
    )
    res = conn.getresponse()
    assert res.status == 200
    assert res.getheader("content-type").startswith("text/event-stream")
    events: list[str] = []
    while "telemetry" not in events:
        line = res.fp.readline().decode()
        if line.startswith("event: "):
            events.append(line[7:].strip())
        if line.startswith("data: ") and events[-1] == "telemetry":
            assert json.loads(line[6:])["device_id"] == "sim-0008"
    assert events[0] == "hello"
    conn.close()
    anonymous = console.client()
    assert anonymous.call("GET", "/api/events")[0] == 401


def test_history_is_kept_in_sqlite_and_openapi_documents_the_api(fleet):
    console, _ = fleet
    admin = console.client("admin")
    points = wait_until(
        lambda: admin.get("/api/devices/sim-0009/telemetry?window_s=600")["points"], "history"
    )
    assert points[-1]["tenants"]["efficientnet-lite0"]["fps"] >= 0
    db = sqlite3.connect(console.db)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM telemetry WHERE device_id = 'sim-0009'").fetchone()[0] > 0
        assert db.execute("SELECT COUNT(*) FROM devices").fetchone()[0] == SIM_DEVICES
    finally:
        db.close()
    spec = admin.get("/openapi.json")
    for path, method in [
        ("/api/devices", "get"),
        ("/api/devices/{device_id}", "get"),
        ("/api/devices/{device_id}/placement", "put"),
        ("/api/devices/{device_id}/auto-place", "post"),
        ("/api/fleet/move", "post"),
        ("/api/events", "get"),
        ("/api/login", "post"),
    ]:
        assert method in spec["paths"][path], path


def test_bad_messages_are_counted_and_a_cleared_status_removes_the_device(fleet):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    console, sim = fleet
    admin = console.client("admin")
    before = admin.get("/api/stats")["bad_messages"]
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.connect(sim.host, sim.port)
    pub.loop_start()
    try:
        for topic, payload in [
            ("edge/ghost/telemetry", b"not json"),
            ("edge/ghost/status", b'{"online": "maybe"}'),
            ("edge/ghost/placement", b'{"generation": -1}'),
        ]:
            pub.publish(topic, payload, qos=1).wait_for_publish(10)
        wait_until(lambda: admin.get("/api/stats")["bad_messages"] >= before + 3, "bad messages counted")
        assert device_detail(admin, "ghost") is None  # nothing invented from garbage
        status = Status(online=True, device_id="ghost", capabilities=CAPS).model_dump_json().encode()
        pub.publish("edge/ghost/status", status, qos=1, retain=True).wait_for_publish(10)
        wait_until(lambda: device_detail(admin, "ghost"), "the device from a valid status")
        pub.publish("edge/ghost/status", b"", qos=1, retain=True).wait_for_publish(10)
        wait_until(lambda: device_detail(admin, "ghost") is None, "the device gone with its retained status")
        assert admin.get("/api/stats")["handler_errors"] == 0
        assert admin.get("/api/devices")["stats"]["online"] == SIM_DEVICES  # ingest went on
    finally:
        pub.loop_stop()
        pub.disconnect()


def test_logout_ends_the_session(fleet):
    console, _ = fleet
    client = console.client("viewer")
    cookie = client.session_cookie()
    assert client.call("POST", "/api/logout")[0] == 200
    replay = console.client()
    status, _ = replay.call("GET", "/api/session", headers={"Cookie": f"edge_console_session={cookie}"})
    assert status == 401


# -- with the real agent -----------------------------------------------------------------------------
def test_real_agent_placement_and_auto_place(agent_factory, broker, collector, tmp_path):
    agent = agent_factory("edge1", "[metrics]\ntelemetry_interval_s = 0.5\n").start()
    agent.wait_ready()
    statuses = collector(["edge/edge1/status"])
    console = ConsoleProcess(broker.url, tmp_path).start()
    try:
        admin = console.client("admin")
        detail = wait_until(lambda: device_detail(admin, "edge1"), "the agent in the console")
        assert detail["capabilities"]["backends"]["onnxruntime"]["available"]
        assert "efficientnet-lite0" in detail["capabilities"]["models"]
        body = {"tenants": [{"model": "efficientnet-lite0", "backend": "openvino", "device": "CPU"}]}
        status, data = admin.call("PUT", "/api/devices/edge1/placement", body)
        assert status == 200, data
        gen = data["generation"]
        wait_until(
            lambda: tracking_state(admin, "edge1", gen, {"applied"}), "the agent applied it", timeout=90
        )

        def agent_applied(msgs: list[dict[str, Any]]) -> bool:
            last = msgs[-1] if msgs else {}
            placement = last.get("placement") or {}
            return placement.get("applied_generation") == gen and any(
                t["backend"] == "openvino" and t["state"] == "ready" for t in placement.get("tenants", [])
            )

        statuses.wait_for(agent_applied, "edge/edge1/status", timeout=60)
        # Auto-place: the agent decides, or refuses (older agents do not know "auto"): shown either way.
        status, data = admin.call("POST", "/api/devices/edge1/auto-place")
        assert status == 200, data
        tracking = wait_until(
            lambda: tracking_state(admin, "edge1", data["generation"], {"refused", "applied", "failed"}),
            "the agent's answer to auto-place",
            timeout=90,
        )
        assert tracking["state"] == "applied", tracking  # this agent knows "auto"
        # The edit starting point is what the agent chose, so a fleet move from it reaches edge1.
        chosen = device_detail(admin, "edge1")["editable_tenants"][0]
        assert chosen["backend"] != "auto", chosen
        target = "onnxruntime" if chosen["backend"] != "onnxruntime" else "openvino"
        move = {"model": "efficientnet-lite0", "from_backend": chosen["backend"], "to_backend": target}
        status, data = admin.call("POST", "/api/fleet/move", move)
        assert status == 200 and [p["device_id"] for p in data["published"]] == ["edge1"], data
        wait_until(
            lambda: tracking_state(admin, "edge1", data["published"][0]["generation"], {"applied"}),
            "the move applied",
            timeout=90,
        )
    finally:
        assert console.stop() == 0, console.log()[-2000:]


def test_console_reconnects_after_the_broker_restarts(broker, tmp_path):
    sim = FleetSimulator(broker.host, broker.port, 3, interval_s=0.5, id_prefix="rc").start()
    console = ConsoleProcess(broker.url, tmp_path).start()
    try:
        admin = console.client("admin")
        wait_until(lambda: admin.get("/api/devices")["stats"]["online"] == 3, "devices")
        broker.restart()  # same port; the broker forgot everything (no persistence)
        wait_until(
            lambda: admin.get("/api/stats")["mqtt_connects"] >= 2, "the console to reconnect", timeout=90
        )
        body = {"tenants": [{"model": "efficientnet-lite0", "backend": "openvino", "device": "NPU"}]}
        _, data = wait_until(
            lambda: (r := admin.call("PUT", "/api/devices/rc-0000/placement", body))[0] == 200 and r,
            "a placement accepted after the reconnect",
        )
        wait_until(lambda: tracking_state(admin, "rc-0000", data["generation"], {"applied"}), "applied")
    finally:
        console.stop()
        sim.stop()


def test_shared_subscription_splits_telemetry_between_workers(broker, tmp_path):
    sim = FleetSimulator(broker.host, broker.port, 4, interval_s=0.25, id_prefix="sh").start()
    workers = []
    try:
        for name in ("w1", "w2"):
            workdir = tmp_path / name
            workdir.mkdir()
            workers.append(ConsoleProcess(broker.url, workdir, ["--shared-group", "console"]).start())
        clients = [w.client("viewer") for w in workers]

        def split() -> list[dict[str, Any]] | None:
            stats = [c.get("/api/stats") for c in clients]
            return stats if all(s["by_kind"]["telemetry"] >= 20 for s in stats) else None

        stats = wait_until(split, "telemetry at both workers")
        sent = sim.telemetry_sent
        # Each message went to one worker, not to both; both know every device (status is not shared).
        assert sum(s["by_kind"]["telemetry"] for s in stats) <= sent
        assert all(s["devices"] == 4 for s in stats)
    finally:
        for worker in workers:
            worker.stop()
        sim.stop()


def test_oversized_bodies_are_refused_before_they_are_read(broker, tmp_path):
    """Login takes bodies from anyone: a huge one is a 413, not hundreds of MB of console memory."""
    console = ConsoleProcess(broker.url, tmp_path).start()
    try:
        big = b'{"username": "admin", "password": "' + b"a" * 5_000_000 + b'"}'
        conn = http.client.HTTPConnection("127.0.0.1", console.port, timeout=60)
        conn.request("POST", "/api/login", body=big, headers={"Content-Type": "application/json"})
        res = conn.getresponse()
        assert res.status == 413 and len(res.read()) < 1000
        conn.close()

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b"username=admin&password="
            for _ in range(40):
                yield b"a" * 65536

        conn = http.client.HTTPConnection("127.0.0.1", console.port, timeout=60)
        conn.request(
            "POST",
            "/login",
            body=chunks(),
            headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": console.base},
            encode_chunked=True,
        )
        assert conn.getresponse().status == 413
        conn.close()
        admin = console.client("admin")  # still serving
        assert admin.get("/api/session")["user"] == "admin"
    finally:
        assert console.stop() == 0, console.log()[-2000:]

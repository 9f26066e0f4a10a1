"""The secured fleet as shipped: the repo's broker config (TLS listener, mutual TLS, passwords) and its
ACL, unchanged but for ports and file paths, on a real Mosquitto; a real agent that requires signed
placements, with Home Assistant discovery and failover on; and every feature run as the role that
uses it: the device's own client commands, a camera's, an operator's, Home Assistant's, the console's.
Each must work, and another device's topics must stay closed. One broker and one agent for the
module: the tests run in file order, the ones that move the model last."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.devtools.local_broker import LocalBroker
from agent.protocol.signing import generate_keypair
from backends import registry
from tests.conftest import CAT_CLASSES, REPO, SAMPLES, AgentProcess, Collector, passwd_file
from tests.pki import make_pki
from tests.test_console import Client, ConsoleProcess, tracking_state, wait_until

pytestmark = pytest.mark.timeout(300)
BROKER_CONF = REPO / "deploy" / "mosquitto" / "edge-broker.conf"
ACL = REPO / "deploy" / "mosquitto" / "edge-acl.conf"
MODEL = "efficientnet-lite0"
DEVICE = "cam-01"
# Every broker user of the fleet; each has its own client certificate and the password "<user>-pw".
USERS = ("console", "cam-01", "cam-02", "camera-cam-01", "operator", "homeassistant")


class RepoConfigBroker(LocalBroker):
    """Mosquitto run with deploy/mosquitto/edge-broker.conf as shipped: only the paths of the files
    it names (passwords, ACL, certificates) and the listener's port are this test's."""

    def __init__(self, paths: dict[str, Path]) -> None:
        super().__init__(anonymous=False)
        self.paths = paths

    def _write_config(self) -> Path:
        text = BROKER_CONF.read_text()
        for shipped, ours in {
            "/etc/mosquitto/edge.passwd": self.paths["passwd"],
            "/etc/mosquitto/edge-acl.conf": self.paths["acl"],
            "/etc/mosquitto/certs/ca.pem": self.paths["ca"],
            "/etc/mosquitto/certs/server.pem": self.paths["server_cert"],
            "/etc/mosquitto/certs/server.key": self.paths["server_key"],
            "listener 8883": f"listener {self.port} 127.0.0.1",
        }.items():
            assert shipped in text, f"{BROKER_CONF} no longer names {shipped}"
            text = text.replace(shipped, str(ours))
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(text + "persistence false\n")
        return conf


@dataclass
class Fleet:
    port: int
    pki: dict[str, Path]
    sign_key: Path
    agent: AgentProcess
    configs: dict[str, Path]  # a role -> the agent.toml its client commands read
    workdir: Path

    def tls(self, user: str) -> dict[str, str]:
        return {
            "ca_certs": str(self.pki["ca"]),
            "certfile": str(self.pki[f"{user}_cert"]),
            "keyfile": str(self.pki[f"{user}_key"]),
        }

    def mqtt(self, user: str, topics: list[str]) -> Collector:
        """A subscriber logged in as `user` with its own certificate (paho, MQTT 5)."""
        return Collector(self.port, topics, user, f"{user}-pw", self.tls(user))

    def cli(self, role: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`edge-agent <command> --config <the role's config> ...` as a user would run it."""
        command, *rest = args
        return subprocess.run(
            [sys.executable, "-m", "agent", command, "--config", str(self.configs[role]), *rest],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=REPO,
        )

    def alive(self) -> None:
        if self.agent.proc is not None and self.agent.proc.poll() is not None:
            raise AssertionError(f"the agent exited:\n{self.agent.log()[-3000:]}")


def broker_section(port: int, pki: dict[str, Path], user: str, extra: str = "") -> str:
    """The [broker] section every role's config has: the shipped listener, its user, its certificate."""
    return (
        f'device_id = "{DEVICE}"\n[broker]\nhost = "127.0.0.1"\nport = {port}\n'
        f'username = "{user}"\npassword = "{user}-pw"\n{extra}[broker.tls]\nenabled = true\n'
        f'ca_file = "{pki["ca"]}"\ncert_file = "{pki[f"{user}_cert"]}"\nkey_file = "{pki[f"{user}_key"]}"\n'
    )


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    # A folder Mosquitto can read after dropping to its own user (pytest's tmp_path is root-only).
    workdir = Path(tempfile.mkdtemp(prefix="edge-secured-"))
    workdir.chmod(0o755)
    pki = make_pki(workdir / "pki", clients=USERS)
    acl = workdir / "edge-acl.conf"
    acl.write_text(ACL.read_text())
    acl.chmod(0o644)
    passwd = passwd_file(workdir, {u: f"{u}-pw" for u in USERS})
    broker = RepoConfigBroker({"passwd": passwd, "acl": acl, **pki})
    # The console's signing key, and an older key the devices still hold during a rotation.
    (workdir / "old").mkdir()
    _, old_public = generate_keypair(workdir / "old")
    sign_key, console_public = generate_keypair(workdir)
    keys = json.dumps([old_public.read_text().strip(), console_public.read_text().strip()])
    state = workdir / DEVICE
    state.mkdir()
    with broker:
        port = broker.port
        agent = AgentProcess(
            broker,
            state,
            DEVICE,
            broker_section(port, pki, DEVICE)
            + f"[security]\nplacement_public_key = {keys}\n[metrics]\ntelemetry_interval_s = 0.5\n"
            + "[homeassistant]\nenabled = true\nstate_interval_s = 1.0\n"
            + "[failover]\nerrors_to_fail = 1\nfailback_after_s = 3600\n",
            # One runtime error on OpenVINO (the first frame it serves): the failover test's event.
            env={"EDGE_AGENT_FAULTS": "openvino:CPU:error:after=0:once"},
        )
        at = agent.args.index("--broker")
        del agent.args[at : at + 2]  # the broker comes from the config, as for the client commands
        configs = {"device": agent.config_path}
        for role, user, extra in (
            ("device-3.1.1", DEVICE, 'protocol = "3.1.1"\n'),
            ("camera", "camera-cam-01", ""),
            ("camera-3.1.1", "camera-cam-01", 'protocol = "3.1.1"\n'),
            ("operator", "operator", ""),
        ):
            configs[role] = workdir / f"{role}.toml"
            configs[role].write_text(broker_section(port, pki, user, extra))
        agent.start()
        AgentProcess.running.discard(agent)  # it serves the whole module, not one test
        f = Fleet(port, pki, sign_key, agent, configs, workdir)
        try:
            status = f.mqtt("console", [f"edge/{DEVICE}/status"])
            try:

                def serving(got: list[dict[str, Any]]) -> bool:
                    f.alive()
                    tenants = got[-1]["placement"]["tenants"] if got and got[-1].get("online") else []
                    return bool(tenants) and all(t["state"] == "ready" for t in tenants)

                status.wait_for(serving, f"edge/{DEVICE}/status", timeout=120)
            finally:
                status.close()
            yield f
        finally:
            agent.stop()
            shutil.rmtree(workdir, ignore_errors=True)


def answers(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def is_cat(answer: dict[str, Any]) -> bool:
    return "top" in answer and answer["top"][0]["index"] in CAT_CLASSES


# -- the device's own config and user ---------------------------------------------------------------
def test_the_device_infers_and_reads_its_status_with_its_own_config(fleet: Fleet) -> None:
    """`edge-agent infer` and `status` on the device, with /etc/edge-agent/agent.toml: its user may
    send itself frames, read its answers (MQTT 5 reply topic, and the result topic over 3.1.1) and
    read its own status."""
    cat = str(SAMPLES / "cat.jpg")
    for role in ("device", "device-3.1.1"):
        done = fleet.cli(role, "infer", cat, "--json", "--timeout", "30")
        assert done.returncode == 0, (role, done.stdout, done.stderr)
        (answer,) = answers(done.stdout)
        assert is_cat(answer), (role, answer)
    done = fleet.cli("device", "status", "--timeout", "10")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["online"] and status["device_id"] == DEVICE


# -- a camera ---------------------------------------------------------------------------------------
def test_a_camera_user_infers_and_streams_through_its_device(fleet: Fleet) -> None:
    """The camera user the ACL ships (`camera-cam-01`): `infer` over MQTT 5 (its reply topic) and
    3.1.1 (the result topic), and `edge-agent camera` on a video file."""
    cat = str(SAMPLES / "cat.jpg")
    for role in ("camera", "camera-3.1.1"):
        done = fleet.cli(role, "infer", cat, "--json", "--timeout", "30")
        assert done.returncode == 0, (role, done.stdout, done.stderr)
        assert is_cat(answers(done.stdout)[0]), (role, done.stdout)
    video = fleet.workdir / "cat.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"mp4v"), 10.0, (320, 240))
    frame = cv2.resize(cv2.imread(str(SAMPLES / "cat.jpg")), (320, 240), interpolation=cv2.INTER_AREA)
    for _ in range(3):
        writer.write(frame)
    writer.release()
    done = fleet.cli("camera", "camera", str(video), "--frames", "3", "--json", "--timeout", "30")
    assert done.returncode == 0, (done.stdout, done.stderr)
    got = answers(done.stdout)
    assert len(got) == 3 and all(is_cat(a) for a in got), got


# -- Home Assistant ---------------------------------------------------------------------------------
def test_home_assistant_reads_discovery_configs_states_and_availability(fleet: Fleet) -> None:
    """As Home Assistant's broker user: the device's retained discovery configs, its sensor states
    and its availability (status) arrive; the device could publish them all."""
    node = f"edge_{DEVICE}"
    ha = fleet.mqtt("homeassistant", ["homeassistant/#", "edge/+/ha/+/+", "edge/+/status"])
    try:
        ha.publish("homeassistant/status", b"online")  # HA's birth message: allowed for its user
        configs = ha.wait_for(
            lambda c: any(d.get("state_topic") == f"edge/{DEVICE}/ha/{MODEL}/stats" for d in c),
            f"homeassistant/sensor/{node}/{MODEL.replace('.', '_')}_fps/config",
            timeout=60,
        )
        assert configs[-1]["availability"][0]["topic"] == f"edge/{DEVICE}/status"
        stats = ha.wait_for(lambda s: bool(s), f"edge/{DEVICE}/ha/{MODEL}/stats", timeout=60)
        assert "fps" in stats[-1], stats[-1]
        assert ha.wait_for(lambda s: bool(s), f"edge/{DEVICE}/status")[-1]["online"]
    finally:
        ha.close()


# -- the ACL between devices ------------------------------------------------------------------------
def test_another_device_can_neither_write_nor_read_this_devices_topics(fleet: Fleet) -> None:
    """cam-02 (a valid certificate and password of its own) cannot place, speak as, or feed cam-01,
    nor announce Home Assistant entities for it, nor read cam-01's frames, answers or a camera's
    replies; the camera cannot feed cam-02. What reached cam-01's topics is read as the console and
    Home Assistant would, up to a marker published after the attempts (Mosquitto delivers in order)."""
    watch = fleet.mqtt("console", [f"edge/{DEVICE}/placement", f"edge/{DEVICE}/status"])
    ha = fleet.mqtt("homeassistant", [f"homeassistant/+/edge_{DEVICE}/+/config"])
    spy = fleet.mqtt(
        "cam-02", [f"edge/{DEVICE}/#", "edge/+/reply/#", "edge/cam-02/infer", "edge/cam-02/status"]
    )
    rogue = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5, client_id="cam-02-rogue")
    rogue.username_pw_set("cam-02", "cam-02-pw")
    rogue.tls_set(**fleet.tls("cam-02"))
    connected = threading.Event()
    rogue.on_connect = lambda *_: connected.set()
    rogue.connect("127.0.0.1", fleet.port)
    rogue.loop_start()
    try:
        assert connected.wait(30), "cam-02 could not connect at all"
        forged = {"generation": 999, "tenants": [], "signature": "forged"}
        for topic, payload in (
            (f"edge/{DEVICE}/placement", json.dumps(forged).encode()),
            (f"edge/{DEVICE}/status", b'{"online": false, "forged": true}'),
            (f"edge/{DEVICE}/infer", b"not a frame"),
            (f"homeassistant/sensor/edge_{DEVICE}/forged/config", b'{"forged": true}'),
        ):
            rogue.publish(topic, payload, qos=1).wait_for_publish(10)
        # Traffic cam-02 must not see: a camera's frame and its answer on cam-01's reply topic.
        done = fleet.cli("camera", "infer", str(SAMPLES / "cat.jpg"), "--json", "--timeout", "30")
        assert done.returncode == 0, done.stderr
        camera = fleet.mqtt("camera-cam-01", [])
        try:
            camera.publish("edge/cam-02/infer", b"not its device")
        finally:
            camera.close()
        watch.publish(f"edge/{DEVICE}/placement", b'{"marker": true}')
        seen = watch.wait_for(lambda m: {"marker": True} in m, f"edge/{DEVICE}/placement")
        # cam-02's own status marks the end of what it was sent (it may write and read it).
        rogue.publish("edge/cam-02/status", b'{"marker": true}', qos=1).wait_for_publish(10)
        spy.wait_for(lambda m: {"marker": True} in m, "edge/cam-02/status")
    finally:
        rogue.loop_stop()
        rogue.disconnect()
        watch.close()
    try:
        assert forged not in seen, "cam-02 placed on cam-01"
        assert not any(s.get("forged") for s in watch.json(f"edge/{DEVICE}/status")), "cam-02 spoke as cam-01"
        assert not [m.topic for m in ha.messages if b"forged" in m.payload], "cam-02 announced for cam-01"
        leaked = [m.topic for m in spy.messages if m.topic != "edge/cam-02/status"]
        assert not leaked, f"cam-02 read: {leaked}"
    finally:
        spy.close()
        ha.close()


def test_what_a_role_may_not_do_is_told_at_once_with_the_topic(fleet: Fleet) -> None:
    """Refusals by the ACL are reported, not waited out: the device may not place itself (only the
    console and an operator may), a camera may not feed another device; a status it may not read
    says which topic and which user."""
    done = fleet.cli("device", "place", "--model", MODEL, "--timeout", "120")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert f"refused the publish to edge/{DEVICE}/placement: Not authorized" in done.stderr, done.stderr
    done = fleet.cli("camera", "infer", str(SAMPLES / "cat.jpg"), "--device-id", "cam-02", "--timeout", "120")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "refused the publish to edge/cam-02/infer: Not authorized" in done.stderr, done.stderr
    done = fleet.cli("camera", "status", "--timeout", "2")
    assert done.returncode == 1
    assert f"edge/{DEVICE}/status" in done.stderr and "user camera-cam-01" in done.stderr, done.stderr


# -- the console ------------------------------------------------------------------------------------
def test_console_moves_tokens_and_signed_placements(fleet: Fleet) -> None:
    """The console with its certificate and signing key, driven through its API with tokens: a fleet
    move there and back applied, a placement edit answered with its signature, an unsigned and a
    replayed document refused, a viewer's token refused, a revoked token stops working."""
    console = ConsoleProcess(
        f"mqtts://console:console-pw@127.0.0.1:{fleet.port}",
        fleet.workdir,
        [
            "--sign-key", str(fleet.sign_key),
            "--ca-file", str(fleet.pki["ca"]),
            "--cert-file", str(fleet.pki["console_cert"]),
            "--key-file", str(fleet.pki["console_key"]),
        ],
    )  # fmt: skip
    statuses = fleet.mqtt("console", [f"edge/{DEVICE}/status"])
    try:
        console.start()
        # Tokens: an admin makes one in the console (its login session); the viewer's is made with
        # the CLI. Neither needs a CSRF token or a cookie afterwards.
        status, made = console.client("admin").call(
            "POST", "/api/tokens", {"name": "ci deploys", "role": "admin"}
        )
        assert status == 201, made
        admin_token = made["token"]
        created = subprocess.run(
            [sys.executable, "-m", "cloud_console", "token", "--db", str(console.db), "create",
             "--user", "viewer", "--role", "viewer", "--name", "dashboards"],
            capture_output=True, text=True, timeout=60, cwd=REPO, check=True,
        )  # fmt: skip
        viewer_token = created.stdout.strip()
        api = Client(console.base)  # no cookie, no CSRF token: only the bearer header
        admin = api_as(api, admin_token)
        assert api.call("GET", "/api/devices")[0] == 401
        assert api.call("GET", "/api/devices", headers=bearer(viewer_token + "x"))[0] == 401

        def lite0_on(backend: str) -> bool:
            fleet.alive()
            status, data = admin.call("GET", f"/api/devices/{DEVICE}")
            return status == 200 and any(
                t["model"] == MODEL and t["backend"] == backend and t["state"] == "ready"
                for t in data["summary"]["tenants"]
            )

        wait_until(lambda: lite0_on("onnxruntime"), "cam-01 serving in the console", timeout=120)

        # A placement edit: the answer carries the document as published, signed.
        body = {"tenants": [{"model": MODEL, "backend": "onnxruntime", "device": "cpu"}]}
        status, data = admin.call("PUT", f"/api/devices/{DEVICE}/placement", body)
        assert status == 200, data
        assert data["document"]["signature"] and data["document"]["expires_at"], data["document"]
        edit = data["generation"]
        wait_until(lambda: tracking_state(admin, DEVICE, edit, {"applied"}), "the signed edit applied", 120)

        # A viewer's token may look but not move.
        move = {"model": MODEL, "from_backend": "onnxruntime", "to_backend": "openvino"}
        assert api.call("GET", "/api/devices", headers=bearer(viewer_token))[0] == 200
        status, data = api.call("POST", "/api/fleet/move", move, headers=bearer(viewer_token))
        assert status == 403, data

        # The admin's token moves the model; the console signs; the agent (signatures required)
        # applies it.
        status, data = admin.call("POST", "/api/fleet/move", move)
        assert status == 200 and [p["device_id"] for p in data["published"]] == [DEVICE], data
        first = data["published"][0]["generation"]
        wait_until(
            lambda: tracking_state(admin, DEVICE, first, {"applied", "refused"}),
            "the agent's answer to the signed move",
            timeout=120,
        )
        assert tracking_state(admin, DEVICE, first, {"applied"}), fleet.agent.log()[-2000:]
        wait_until(lambda: lite0_on("openvino"), "lite0 on OpenVINO", timeout=60)
        back = {"model": MODEL, "from_backend": "openvino", "to_backend": "onnxruntime"}
        status, data = admin.call("POST", "/api/fleet/move", back)
        assert status == 200, data
        second = data["published"][0]["generation"]
        wait_until(lambda: tracking_state(admin, DEVICE, second, {"applied"}), "the move back applied", 120)
        status, log = admin.call("GET", f"/api/devices/{DEVICE}/placements")
        assert status == 200
        published = {row["generation"]: json.loads(row["document"]) for row in log["placements"]}
        assert (
            published[first]["signature"] and published[first]["expires_at"] > published[first]["signed_at"]
        )

        # By hand, with the console's own broker identity: an unsigned document, then a replay of
        # the first signed move (a rollback), are refused.
        hand = fleet.mqtt("console", [])
        try:
            unsigned = {"generation": second + 10, "tenants": [{"model": MODEL, "backend": "openvino"}]}
            hand.publish(f"edge/{DEVICE}/placement", json.dumps(unsigned).encode())
            got = statuses.wait_for(
                lambda s: refused_reason(s, second + 10) is not None, f"edge/{DEVICE}/status"
            )
            assert "unsigned" in str(refused_reason(got, second + 10))
            hand.publish(f"edge/{DEVICE}/placement", json.dumps(published[first]).encode())
            got = statuses.wait_for(lambda s: refused_reason(s, first) is not None, f"edge/{DEVICE}/status")
            assert "replayed" in str(refused_reason(got, first))
        finally:
            hand.close()
        last = got[-1]["placement"]
        assert last["applied_generation"] == second
        assert [(t["backend"], t["state"]) for t in last["tenants"]] == [("onnxruntime", "ready")]

        # The revoked admin token stops working at once.
        token_id = made["id"]
        assert console.client("admin").call("DELETE", f"/api/tokens/{token_id}")[0] == 200
        assert api.call("GET", "/api/devices", headers=bearer(admin_token))[0] == 401
        listed = console.client("admin").get("/api/tokens")
        row = next(t for t in listed if t["id"] == token_id)
        assert row["revoked"] and row["last_used"], row
        assert all("token" not in t and "hash" not in t for t in listed)
    finally:
        statuses.close()
        console.stop()


# -- an operator: place, then the failover it leads to ----------------------------------------------
def test_an_operator_places_candidates_and_reads_the_failover_event(fleet: Fleet) -> None:
    """`edge-agent place --sign-key` as the operator user puts lite0 on OpenVINO with ONNX Runtime
    as fallback; the first frame OpenVINO serves fails (injected), the tenant fails over, the frame is
    still answered, and the operator reads the event the device published."""
    ok, _devices, reason = registry.capabilities_of("openvino")
    if not ok:
        pytest.skip(f"OpenVINO unavailable: {reason}")
    events = fleet.mqtt("operator", [f"edge/{DEVICE}/events"])
    try:
        done = fleet.cli(
            "operator", "place", "--model", MODEL, "--candidates", "openvino:CPU,onnxruntime:cpu",
            "--sign-key", str(fleet.sign_key), "--timeout", "120",
        )  # fmt: skip
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert "applied generation" in done.stdout, done.stdout
        done = fleet.cli("operator", "infer", str(SAMPLES / "cat.jpg"), "--json", "--timeout", "60")
        assert done.returncode == 0, (done.stdout, done.stderr)
        (answer,) = answers(done.stdout)
        assert is_cat(answer) and answer["tenant"]["backend"] == "onnxruntime", answer
        got = events.wait_for(lambda e: bool(e), f"edge/{DEVICE}/events", timeout=60)
        assert (got[0]["kind"], got[0]["from"], got[0]["to"]) == (
            "failover",
            "openvino:CPU",
            "onnxruntime:cpu",
        )
    finally:
        events.close()


def test_a_device_joins_a_pool_and_a_camera_sends_to_it_under_the_shipped_acl(fleet: Fleet) -> None:
    """Device pools under the shipped ACL (docs/security.md): the operator places the tenant in pool
    `driveway` (signed); the device takes the pool's frames through its shared subscription and
    announces itself (read by the console user); the camera user sends to the pool over MQTT 5 (its
    pool reply topic) and 3.1.1 (the pool's result topic) and gets the device's answers."""
    members = fleet.mqtt("console", ["edge/pool/driveway/members"])
    try:
        done = fleet.cli(
            "operator", "place", "--model", MODEL, "--pool", "driveway",
            "--sign-key", str(fleet.sign_key), "--timeout", "120",
        )  # fmt: skip
        assert done.returncode == 0 and "applied generation" in done.stdout, (done.stdout, done.stderr)
        members.wait_for(
            lambda got: any(m["device_id"] == DEVICE and m["open"] for m in got), "edge/pool/driveway/members"
        )
        for role in ("camera", "camera-3.1.1"):
            done = fleet.cli(
                role, "infer", str(SAMPLES / "cat.jpg"), "--pool", "driveway", "--model", MODEL, "--json"
            )
            assert done.returncode == 0, (role, done.stdout, done.stderr)
            (answer,) = answers(done.stdout)
            assert is_cat(answer) and (answer["pool"], answer["served_by"]) == ("driveway", DEVICE), answer
    finally:
        members.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refused_reason(statuses: list[dict[str, Any]], generation: int) -> str | None:
    refused = ((statuses[-1].get("placement") or {}).get("refused") or {}) if statuses else {}
    return str(refused["reason"]) if refused.get("generation") == generation else None


def api_as(api: Client, token: str) -> Client:
    """`api` sending `token` on every call (tracking_state takes a Client)."""

    class WithToken(Client):
        def call(self, method, path, body=None, headers=None):  # type: ignore[no-untyped-def]
            return super().call(method, path, body, {**(headers or {}), **bearer(token)})

    return WithToken(api.base)


# -- the client commands read the agent's config --------------------------------------------------
def test_client_commands_use_the_topic_prefix_of_the_config_they_read(
    broker: LocalBroker, tmp_path: Path
) -> None:
    """An agent with `broker.topic_prefix = "plant"`: `infer`, `camera` and `status` with its config
    reach it there (they used to talk on `edge/...` whatever the config said)."""
    config = f'device_id = "{DEVICE}"\n[broker]\nhost = "127.0.0.1"\nport = {broker.port}\ntopic_prefix = "plant"\n'
    agent = AgentProcess(broker, tmp_path, DEVICE, config)
    at = agent.args.index("--broker")
    del agent.args[at : at + 2]
    agent.start()
    status = Collector(broker.port, [f"plant/{DEVICE}/status"])
    try:
        status.wait_for(
            lambda s: (
                bool(s) and s[-1].get("online") and s[-1]["placement"]["tenants"][0]["state"] == "ready"
            ),
            f"plant/{DEVICE}/status",
            timeout=120,
        )
    finally:
        status.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command, *rest = args
        return subprocess.run(
            [sys.executable, "-m", "agent", command, "--config", str(agent.config_path), *rest],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )  # fmt: skip

    done = cli("infer", str(SAMPLES / "cat.jpg"), "--json", "--timeout", "20")
    assert done.returncode == 0 and is_cat(answers(done.stdout)[0]), (done.stdout, done.stderr)
    done = cli("camera", str(SAMPLES / "cat.jpg"), "--frames", "1", "--json", "--timeout", "20")
    assert done.returncode == 0 and is_cat(answers(done.stdout)[0]), (done.stdout, done.stderr)
    done = cli("status", "--timeout", "10")
    assert done.returncode == 0 and json.loads(done.stdout)["device_id"] == DEVICE, done.stderr
    agent.stop()

"""The whole secured path in one test: the repo's broker config (TLS listener, mutual TLS, passwords,
the shipped ACL) on a real Mosquitto, a real agent that requires signed placements, and the real
console with its own client certificate and signing key, driven through its API with tokens."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.devtools.local_broker import LocalBroker
from agent.protocol.signing import generate_keypair
from tests.conftest import REPO, AgentProcess, Collector, passwd_file
from tests.pki import make_pki
from tests.test_console import Client, ConsoleProcess, tracking_state, wait_until

pytestmark = pytest.mark.timeout(300)
BROKER_CONF = REPO / "deploy" / "mosquitto" / "edge-broker.conf"
ACL = REPO / "deploy" / "mosquitto" / "edge-acl.conf"
MODEL = "efficientnet-lite0"


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


def tls_of(pki: dict[str, Path], name: str) -> dict[str, str]:
    return {
        "ca_certs": str(pki["ca"]),
        "certfile": str(pki[f"{name}_cert"]),
        "keyfile": str(pki[f"{name}_key"]),
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refused_reason(statuses: list[dict[str, Any]], generation: int) -> str | None:
    refused = ((statuses[-1].get("placement") or {}).get("refused") or {}) if statuses else {}
    return str(refused["reason"]) if refused.get("generation") == generation else None


def test_secured_fleet_end_to_end(shared_dir, tmp_path):
    pki = make_pki(shared_dir / "pki", clients=("console", "cam-01", "cam-02"))
    passwords = {"console": "console-pw", "cam-01": "cam-01-pw", "cam-02": "cam-02-pw"}
    acl = shared_dir / "edge-acl.conf"
    acl.write_text(ACL.read_text())
    acl.chmod(0o644)
    broker = RepoConfigBroker({"passwd": passwd_file(shared_dir, passwords), "acl": acl, **pki})
    # The console's signing key, and an older key the devices still hold during a rotation.
    (tmp_path / "old").mkdir()
    _, old_public = generate_keypair(tmp_path / "old")
    sign_key, console_public = generate_keypair(tmp_path)
    keys = json.dumps([old_public.read_text().strip(), console_public.read_text().strip()])
    state = tmp_path / "cam-01"
    state.mkdir()
    with broker:
        url = f"mqtts://127.0.0.1:{broker.port}"
        agent = AgentProcess(
            broker,
            state,
            "cam-01",
            f"[security]\nplacement_public_key = {keys}\n[metrics]\ntelemetry_interval_s = 0.5\n"
            f'[broker]\nusername = "cam-01"\npassword = "cam-01-pw"\n[broker.tls]\nenabled = true\n'
            f'ca_file = "{pki["ca"]}"\ncert_file = "{pki["cam-01_cert"]}"\nkey_file = "{pki["cam-01_key"]}"\n',
        )
        agent.args[agent.args.index("--broker") + 1] = url
        agent.start()
        console = ConsoleProcess(
            f"mqtts://console:console-pw@127.0.0.1:{broker.port}",
            tmp_path,
            [
                "--sign-key", str(sign_key),
                "--ca-file", str(pki["ca"]),
                "--cert-file", str(pki["console_cert"]),
                "--key-file", str(pki["console_key"]),
            ],
        )  # fmt: skip
        # What the agent reports, read as the console's broker identity would (the ACL lets it).
        statuses = Collector(
            broker.port, ["edge/cam-01/status"], "console", "console-pw", tls_of(pki, "console")
        )
        try:
            console.start()
            # Tokens: an admin makes one in the console (its login session); the viewer's is made
            # with the CLI. Neither needs a CSRF token or a cookie afterwards.
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
            assert api.call("GET", "/api/devices")[0] == 401
            assert api.call("GET", "/api/devices", headers=bearer(viewer_token + "x"))[0] == 401

            def lite0_on(backend: str) -> bool:
                if agent.proc is not None and agent.proc.poll() is not None:
                    raise AssertionError(f"the agent exited:\n{agent.log()[-3000:]}")
                status, data = api.call("GET", "/api/devices/cam-01", headers=bearer(admin_token))
                return status == 200 and any(
                    t["model"] == MODEL and t["backend"] == backend and t["state"] == "ready"
                    for t in data["summary"]["tenants"]
                )

            wait_until(lambda: lite0_on("onnxruntime"), "cam-01 serving in the console", timeout=120)

            # A viewer's token may look but not move.
            move = {"model": MODEL, "from_backend": "onnxruntime", "to_backend": "openvino"}
            assert api.call("GET", "/api/devices", headers=bearer(viewer_token))[0] == 200
            status, data = api.call("POST", "/api/fleet/move", move, headers=bearer(viewer_token))
            assert status == 403, data

            # The admin's token moves the model; the console signs; the agent (signatures
            # required) applies it.
            status, data = api.call("POST", "/api/fleet/move", move, headers=bearer(admin_token))
            assert status == 200 and [p["device_id"] for p in data["published"]] == ["cam-01"], data
            first = data["published"][0]["generation"]
            wait_until(
                lambda: tracking_state(api_as(api, admin_token), "cam-01", first, {"applied", "refused"}),
                "the agent's answer to the signed move",
                timeout=120,
            )
            assert tracking_state(api_as(api, admin_token), "cam-01", first, {"applied"}), agent.log()[-2000:]
            wait_until(lambda: lite0_on("openvino"), "lite0 on OpenVINO", timeout=60)
            back = {"model": MODEL, "from_backend": "openvino", "to_backend": "onnxruntime"}
            status, data = api.call("POST", "/api/fleet/move", back, headers=bearer(admin_token))
            assert status == 200, data
            second = data["published"][0]["generation"]
            wait_until(
                lambda: tracking_state(api_as(api, admin_token), "cam-01", second, {"applied"}),
                "the move back applied",
                timeout=120,
            )
            status, log = api.call("GET", "/api/devices/cam-01/placements", headers=bearer(admin_token))
            assert status == 200
            published = {row["generation"]: json.loads(row["document"]) for row in log["placements"]}
            assert (
                published[first]["signature"]
                and published[first]["expires_at"] > published[first]["signed_at"]
            )

            # By hand, with the console's own broker identity (the only one the ACL lets place):
            # an unsigned document, then a replay of the first signed move (a rollback), are refused.
            hand = Collector(broker.port, [], "console", "console-pw", tls_of(pki, "console"))
            try:
                unsigned = {"generation": second + 10, "tenants": [{"model": MODEL, "backend": "openvino"}]}
                hand.publish("edge/cam-01/placement", json.dumps(unsigned).encode())
                got = statuses.wait_for(
                    lambda s: refused_reason(s, second + 10) is not None, "edge/cam-01/status"
                )
                assert "unsigned" in refused_reason(got, second + 10)
                hand.publish("edge/cam-01/placement", json.dumps(published[first]).encode())
                got = statuses.wait_for(lambda s: refused_reason(s, first) is not None, "edge/cam-01/status")
                assert "replayed" in refused_reason(got, first)
            finally:
                hand.close()
            last = got[-1]["placement"]
            assert last["applied_generation"] == second
            assert [(t["backend"], t["state"]) for t in last["tenants"]] == [("onnxruntime", "ready")]

            # The ACL: cam-02 (a valid certificate and password of its own) cannot write cam-01's
            # topics. What cam-01's topics carried is read as the console identity, up to a marker
            # published after cam-02's attempts (Mosquitto delivers in order).
            watch = Collector(
                broker.port, ["edge/cam-01/placement", "edge/cam-01/status"], "console", "console-pw",
                tls_of(pki, "console"),
            )  # fmt: skip
            rogue = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5, client_id="cam-02")
            rogue.username_pw_set("cam-02", "cam-02-pw")
            rogue.tls_set(**tls_of(pki, "cam-02"))
            connected = threading.Event()
            rogue.on_connect = lambda *_: connected.set()
            rogue.connect("127.0.0.1", broker.port)
            rogue.loop_start()
            try:
                assert connected.wait(30), "cam-02 could not connect at all"
                forged = {"generation": second + 20, "tenants": [], "signature": "forged"}
                for topic, payload in (
                    ("edge/cam-01/placement", json.dumps(forged).encode()),
                    ("edge/cam-01/status", b'{"online": false, "forged": true}'),
                    ("edge/cam-01/infer", b"not a frame"),
                ):
                    rogue.publish(topic, payload, qos=1).wait_for_publish(10)
                watch.publish("edge/cam-01/placement", b'{"marker": true}')
                seen = watch.wait_for(lambda m: {"marker": True} in m, "edge/cam-01/placement")
            finally:
                rogue.loop_stop()
                rogue.disconnect()
                watch.close()
            assert forged not in seen, "cam-02 placed on cam-01"
            assert not any(s.get("forged") for s in watch.json("edge/cam-01/status")), (
                "cam-02 spoke as cam-01"
            )
            assert "forged" not in json.dumps(statuses.json("edge/cam-01/status")[-1]["placement"])
            # And the revoked admin token stops working at once.
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
            agent.stop()


def api_as(api: Client, token: str) -> Client:
    """`api` sending `token` on every call (tracking_state takes a Client)."""

    class WithToken(Client):
        def call(self, method, path, body=None, headers=None):  # type: ignore[no-untyped-def]
            return super().call(method, path, body, {**(headers or {}), **bearer(token)})

    return WithToken(api.base)

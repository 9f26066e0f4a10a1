"""Model delivery end to end: a real console, a real agent, a real Mosquitto (docs/fleet.md).

An operator uploads a new version of a classifier through the console's API (a bearer token),
delivers it to the device, places it, and the answers come from the new version. A version that is
refused by the console or the device never reaches the placement.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.schemas import Status, Telemetry
from agent.protocol.signing import generate_keypair
from cloud_console.fleet import Device
from tests.conftest import MODELS, sample
from tests.test_console import ConsoleProcess, device_detail, tracking_state, wait_until

pytestmark = pytest.mark.timeout(240)

NAME = "efficientnet-lite0"


def new_version(tmp: Path, version: str, label_prefix: str) -> Path:
    """The bundled classifier as `version`, its labels prefixed (so answers show which served)."""
    folder = tmp / f"src-{version}" / NAME
    folder.mkdir(parents=True)
    for file in ("model.toml", "model.onnx", "labels.txt"):
        shutil.copy(MODELS / NAME / file, folder / file)
    toml = (folder / "model.toml").read_text().replace('version = "1.0.0"', f'version = "{version}"')
    (folder / "model.toml").write_text(toml)
    labels = (folder / "labels.txt").read_text().splitlines()
    (folder / "labels.txt").write_text("\n".join(label_prefix + x for x in labels) + "\n")
    return folder


def tar_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return buf.getvalue()


def raw(
    base: str, method: str, path: str, body: bytes | None, token: str, kind: str = "application/gzip"
) -> tuple[int, Any]:
    """A request with a bearer token, as a script or `edge-console models upload` sends it."""
    req = urllib.request.Request(base + path, data=body, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", kind)
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            return res.status, json.loads(res.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def installed_versions(status: dict[str, Any]) -> dict[str, list[str]]:
    caps = status.get("capabilities") or {}
    return {m["name"]: [v["version"] for v in m["versions"]] for m in caps.get("installed", [])}


def test_upload_deliver_place_and_the_new_version_answers(agent_factory, broker, collector, tmp_path):
    console = ConsoleProcess(broker.url, tmp_path).start()
    try:
        admin = console.client("admin")
        status, made = admin.call("POST", "/api/tokens", {"name": "ci", "role": "admin"})
        assert status == 201, made
        token = made["token"]
        config = f'[models]\nconsole_url = "{console.base}"\ntoken = "{token}"\n'
        agent = agent_factory("edge1", config).start()
        agent.wait_ready()
        events = collector(["edge/edge1/events", "edge/edge1/result"])
        statuses = collector(["edge/edge1/status"])

        # Upload: a good version is accepted; a tampered one is refused with the reason.
        good = tar_of(new_version(tmp_path, "1.1.0", "v110 "))
        status, entry = raw(console.base, "POST", "/api/models", good, token)
        assert status == 201, entry
        assert {f["name"] for f in entry["files"]} == {"model.toml", "model.onnx", "labels.txt"}
        bad_folder = new_version(tmp_path, "1.9.9", "v199 ")
        onnx = bytearray((bad_folder / "model.onnx").read_bytes())
        onnx[-100] ^= 0xFF
        (bad_folder / "model.onnx").write_bytes(bytes(onnx))
        status, refused = raw(console.base, "POST", "/api/models", tar_of(bad_folder), token)
        assert status == 422 and "sha256" in refused["detail"], refused
        listed = admin.get("/api/models")
        assert [(e["name"], e["version"]) for e in listed] == [(NAME, "1.1.0")]
        # The console answers a Range request with the rest of the file (what a resumed download asks).
        onnx = next(f for f in entry["files"] if f["name"] == "model.onnx")
        req = urllib.request.Request(f"{console.base}/api/blobs/{onnx['sha256']}")
        req.add_header("Authorization", f"Bearer {token}")
        req.add_header("Range", "bytes=1000-")
        with urllib.request.urlopen(req, timeout=60) as res:
            assert res.status == 206 and len(res.read()) == onnx["size"] - 1000

        # Deliver: the device fetches, verifies and installs; status and events say so.
        body = json.dumps({"model": NAME, "version": "1.1.0"}).encode()
        status, manifest = raw(
            console.base, "POST", "/api/devices/edge1/models", body, token, "application/json"
        )
        assert status == 200, manifest
        statuses.wait_for(
            lambda msgs: bool(msgs) and "1.1.0" in installed_versions(msgs[-1]).get(NAME, []),
            "edge/edge1/status",
            timeout=120,
        )
        outcome = events.wait_for(
            lambda msgs: any(m.get("type") == "delivery" and m["state"] == "installed" for m in msgs),
            "edge/edge1/events",
            timeout=30,
        )
        assert [m["state"] for m in outcome if m.get("type") == "delivery"][:1] == ["downloading"]
        wait_until(
            lambda: any(e["devices"] == ["edge1"] for e in admin.get("/api/models")),
            "the console to list edge1 as having 1.1.0",
        )

        # Place the new version: answers come from it.
        tenants = {"tenants": [{"model": NAME, "version": "1.1.0"}]}
        status, placed = admin.call("PUT", "/api/devices/edge1/placement", tenants)
        assert status == 200, placed
        wait_until(
            lambda: tracking_state(admin, "edge1", placed["generation"], {"applied"}),
            "the placement of 1.1.0 applied",
            timeout=90,
        )
        frame = json.dumps({"request_id": "v-1", "image_b64": base64.b64encode(sample("cat.jpg")).decode()})
        events.publish(f"edge/edge1/infer/{NAME}", frame.encode())
        results = events.wait_for(
            lambda msgs: any(m.get("request_id") == "v-1" for m in msgs), "edge/edge1/result", timeout=60
        )
        answer = next(m for m in results if m.get("request_id") == "v-1")
        assert answer["top"][0]["label"].startswith("v110 "), answer
        detail = device_detail(admin, "edge1")
        assert detail["status"]["placement"]["tenants"][0]["version"] == "1.1.0"

        # Placement follows delivery: upload 1.2.0 with the CLI, place it; the console delivers first.
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "cloud_console",
                "models",
                "upload",
                str(new_version(tmp_path, "1.2.0", "v120 ")),
            ],
            env={**os.environ, "EDGE_CONSOLE_URL": console.base, "EDGE_CONSOLE_TOKEN": token},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0 and f"uploaded {NAME} 1.2.0" in cli.stdout, cli.stderr
        tenants = {"tenants": [{"model": NAME, "version": "1.2.0"}]}
        status, placed = admin.call("PUT", "/api/devices/edge1/placement", tenants)
        assert status == 200, placed
        wait_until(
            lambda: tracking_state(admin, "edge1", placed["generation"], {"applied"}),
            "the placement of 1.2.0 applied",
            timeout=90,
        )
        frame = json.dumps({"request_id": "v-2", "image_b64": base64.b64encode(sample("cat.jpg")).decode()})
        events.publish(f"edge/edge1/infer/{NAME}", frame.encode())
        results = events.wait_for(
            lambda msgs: any(m.get("request_id") == "v-2" for m in msgs), "edge/edge1/result", timeout=60
        )
        answer = next(m for m in results if m.get("request_id") == "v-2")
        assert answer["top"][0]["label"].startswith("v120 "), answer
        # The store lists both versions, each with the device that installed it.
        listing = subprocess.run(
            [sys.executable, "-m", "cloud_console", "models", "list", "--json"],
            env={**os.environ, "EDGE_CONSOLE_URL": console.base, "EDGE_CONSOLE_TOKEN": token},
            capture_output=True,
            text=True,
            timeout=60,
        )
        stored = {e["version"]: e["devices"] for e in json.loads(listing.stdout)}
        assert stored == {"1.1.0": ["edge1"], "1.2.0": ["edge1"]}, listing.stderr
    finally:
        assert console.stop() == 0, console.log()[-2000:]


def test_device_refuses_unsigned_and_foreign_manifests(agent_factory, broker, collector, tmp_path):
    """Where placements must be signed, so must deliveries; and only the console's host is fetched from."""
    _, public = generate_keypair(tmp_path)
    config = (
        f'[security]\nplacement_public_key = "{public.read_text().strip()}"\n'
        '[models]\nconsole_url = "http://127.0.0.1:9"\n'
    )
    agent = agent_factory("edge2", config).start()
    agent.wait_ready()
    events = collector(["edge/edge2/events"])
    unsigned = {
        "model": NAME,
        "version": "9",
        "artifacts": [{"name": "model.toml", "size": 10, "sha256": "0" * 64, "url": "http://127.0.0.1:9/x"}],
    }
    events.publish("edge/edge2/models", json.dumps(unsigned).encode())
    got = events.wait_for(
        lambda msgs: any(m.get("type") == "delivery" for m in msgs), "edge/edge2/events", timeout=30
    )
    refusal = next(m for m in got if m.get("type") == "delivery")
    assert refusal["state"] == "failed" and "unsigned" in refusal["error"], refusal
    assert not (agent.state_dir / "models" / NAME / "9").exists()


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(agent_factory, broker, collector, tmp_path):
    """Digests right, model broken: installed, but placing it fails that tenant and the old serves.
    Then the device is offline when a placement needs a version it lacks, and gets it once back."""
    console = ConsoleProcess(broker.url, tmp_path).start()
    try:
        admin = console.client("admin")
        status, made = admin.call("POST", "/api/tokens", {"name": "edge3", "role": "viewer"})
        assert status == 201, made
        token = made["token"]  # a viewer token is enough for a device to fetch files
        admin_token = admin.call("POST", "/api/tokens", {"name": "ops", "role": "admin"})[1]["token"]
        agent = agent_factory("edge3", f'[models]\nconsole_url = "{console.base}"\ntoken = "{token}"\n')
        agent.start().wait_ready()
        results = collector(["edge/edge3/result", "edge/edge3/status"])
        folder = new_version(tmp_path, "1.3.0", "v130 ")
        (folder / "model.onnx").write_bytes(b"not an onnx graph" * 100)
        toml = (folder / "model.toml").read_text()
        good = hashlib.sha256((MODELS / NAME / "model.onnx").read_bytes()).hexdigest()
        bad = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
        (folder / "model.toml").write_text(toml.replace(good, bad))
        status, entry = raw(console.base, "POST", "/api/models", tar_of(folder), admin_token)
        assert status == 201, entry
        status, data = admin.call("POST", "/api/devices/edge3/models", {"model": NAME})
        assert status == 200 and data["version"] == "1.3.0", data
        results.wait_for(
            lambda msgs: bool(msgs) and "1.3.0" in installed_versions(msgs[-1]).get(NAME, []),
            "edge/edge3/status",
            timeout=120,
        )
        status, placed = admin.call(
            "PUT", "/api/devices/edge3/placement", {"tenants": [{"model": NAME, "version": "1.3.0"}]}
        )
        assert status == 200, placed

        def failed_beside_serving(msgs: list[dict[str, Any]]) -> bool:
            tenants = (msgs[-1].get("placement") or {}).get("tenants", []) if msgs else []
            states = {(t.get("version"), t["state"]) for t in tenants}
            return ("1.3.0", "failed") in states and (None, "ready") in states

        results.wait_for(failed_beside_serving, "edge/edge3/status", timeout=90)
        frame = json.dumps({"request_id": "old-1", "image_b64": base64.b64encode(sample("cat.jpg")).decode()})
        results.publish(f"edge/edge3/infer/{NAME}", frame.encode())
        got = results.wait_for(
            lambda msgs: any(m.get("request_id") == "old-1" for m in msgs), "edge/edge3/result", timeout=60
        )
        answer = next(m for m in got if m.get("request_id") == "old-1")
        assert "top" in answer and not answer["top"][0]["label"].startswith("v130 "), answer

        # `edge-agent place` with a version the device lacks: it says so, and the device refuses it.
        place = subprocess.run(
            [sys.executable, "-m", "agent", "place", "--broker", broker.url, "--device-id", "edge3",
             "--model", NAME, "--model-version", "9.9", "--timeout", "60"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert place.returncode == 1, place.stdout + place.stderr
        assert "not 9.9; first: edge-console models deliver edge3" in place.stdout, place.stdout
        assert "refused: model 'efficientnet-lite0' has no version '9.9'" in place.stdout, place.stdout

        # A device offline when its placement needs a new version: the console sends the manifest
        # again once the device is back, and publishes the placement again once it is installed.
        status, entry = raw(
            console.base, "POST", "/api/models", tar_of(new_version(tmp_path, "1.4.0", "v140 ")), admin_token
        )
        assert status == 201, entry
        agent.stop()
        wait_until(
            lambda: not device_detail(admin, "edge3")["status"]["online"], "the console to see edge3 offline"
        )
        status, placed = admin.call(
            "PUT", "/api/devices/edge3/placement", {"tenants": [{"model": NAME, "version": "1.4.0"}]}
        )
        assert status == 200 and placed["tracking"]["state"] == "pending", placed
        agent.start()

        def serves_140(msgs: list[dict[str, Any]]) -> bool:
            tenants = (msgs[-1].get("placement") or {}).get("tenants", []) if msgs else []
            return [(t.get("serving_version"), t["state"]) for t in tenants] == [("1.4.0", "ready")]

        results.wait_for(serves_140, "edge/edge3/status", timeout=120)
        assert "1.4.0" in installed_versions(results.json("edge/edge3/status")[-1]).get(NAME, [])
        frame = json.dumps(
            {"request_id": "back-1", "image_b64": base64.b64encode(sample("cat.jpg")).decode()}
        )
        results.publish(f"edge/edge3/infer/{NAME}", frame.encode())
        got = results.wait_for(
            lambda msgs: any(m.get("request_id") == "back-1" for m in msgs), "edge/edge3/result", timeout=60
        )
        answer = next(m for m in got if m.get("request_id") == "back-1")
        assert answer["version"] == "1.4.0" and answer["top"][0]["label"].startswith("v140 "), answer
    finally:
        assert console.stop() == 0, console.log()[-2000:]


def test_two_agents_switch_version_while_streaming_every_frame_answered_once(
    agent_factory, broker, collector, tmp_path
):
    """Two real agents take 1.1.0 (placement follows delivery) while each gets frames at 30 fps:
    every frame is answered exactly once, and answers from 1.1.0 arrive on both."""
    console = ConsoleProcess(broker.url, tmp_path).start()
    try:
        admin = console.client("admin")
        token = admin.call("POST", "/api/tokens", {"name": "fleet", "role": "admin"})[1]["token"]
        devices = ["edge-a", "edge-b"]
        for device in devices:
            agent = agent_factory(device, f'[models]\nconsole_url = "{console.base}"\ntoken = "{token}"\n')
            agent.start().wait_ready()
        wait_until(lambda: all(device_detail(admin, d) for d in devices), "both agents in the console")
        status, entry = raw(
            console.base, "POST", "/api/models", tar_of(new_version(tmp_path, "1.1.0", "v110 ")), token
        )
        assert status == 201, entry
        answers = collector([f"edge/{d}/result" for d in devices])
        frame = base64.b64encode(sample("cat.jpg")).decode()
        sent: list[tuple[str, str]] = []
        stop = threading.Event()

        def stream() -> None:
            """30 frames a second to each agent (a camera's pace), until told to stop."""
            n, next_at = 0, time.monotonic()
            while not stop.is_set():
                for device in devices:
                    rid = f"{device}-{n}"
                    payload = json.dumps({"request_id": rid, "image_b64": frame}).encode()
                    answers.publish(f"edge/{device}/infer/{NAME}", payload)
                    sent.append((device, rid))
                n += 1
                next_at += 1 / 30
                stop.wait(max(0.0, next_at - time.monotonic()))

        streamer = threading.Thread(target=stream, daemon=True)
        streamer.start()
        try:
            for device in devices:
                body = {"tenants": [{"model": NAME, "version": "1.1.0"}]}
                status, placed = admin.call("PUT", f"/api/devices/{device}/placement", body)
                assert status == 200, placed

            def new_on_both(_msgs: list[dict[str, Any]]) -> bool:
                got = {d: answers.json(f"edge/{d}/result") for d in devices}
                return len(sent) >= 300 and all(
                    any(m.get("top") and m["top"][0]["label"].startswith("v110 ") for m in got[d])
                    for d in devices
                )

            answers.wait_for(new_on_both, f"edge/{devices[0]}/result", timeout=180)
        finally:
            stop.set()
            streamer.join(10)
        expected = {rid for _, rid in sent}

        def all_answered(_msgs: list[dict[str, Any]]) -> bool:
            seen = {m.get("request_id") for d in devices for m in answers.json(f"edge/{d}/result")}
            return expected <= seen

        answers.wait_for(all_answered, f"edge/{devices[0]}/result", timeout=180)
        ids = [m.get("request_id") for d in devices for m in answers.json(f"edge/{d}/result")]
        assert len(ids) == len(set(ids)) == len(expected), (len(ids), len(set(ids)), len(expected))
        errors = [m for d in devices for m in answers.json(f"edge/{d}/result") if "error" in m]
        assert len(expected) >= 300 and not [e for e in errors if e["error"]["code"] != "overloaded"], errors[
            :3
        ]
    finally:
        assert console.stop() == 0, console.log()[-2000:]


def test_two_versions_serve_side_by_side_and_frames_reach_either(agent_factory, collector, tmp_path):
    """1.0.0 (bundled, pinned) and 2.0.0 (a delivered version, the newest) on one device: `name`
    reaches the default (the unpinned tenant), `name@version` one version exactly, every answer says
    which version served it, and status and telemetry list the two tenants by key."""
    agent = agent_factory("sbs", "[metrics]\ntelemetry_interval_s = 1\n")
    shutil.copytree(new_version(tmp_path, "2.0.0", "v200 "), agent.state_dir / "models" / NAME / "2.0.0")
    agent.start().wait_ready()
    c = collector(["edge/sbs/result", "edge/sbs/status", "edge/sbs/telemetry"])
    placement = {"generation": 1, "tenants": [{"model": NAME}, {"model": NAME, "version": "1.0.0"}]}
    c.publish("edge/sbs/placement", json.dumps(placement).encode(), retain=True)

    def both_ready(msgs: list[dict[str, Any]]) -> bool:
        placed = (msgs[-1].get("placement") or {}) if msgs else {}
        tenants = placed.get("tenants", [])
        return placed.get("applied_generation") == 1 and all(t["state"] == "ready" for t in tenants)

    status = c.wait_for(both_ready, "edge/sbs/status", timeout=90)[-1]
    served = {t["address"]: t["serving_version"] for t in status["placement"]["tenants"]}
    assert served == {NAME: "2.0.0", f"{NAME}@1.0.0": "1.0.0"}, status["placement"]

    image = base64.b64encode(sample("cat.jpg")).decode()
    asks = {"a-default": NAME, "a-v1": f"{NAME}@1.0.0", "a-v2": f"{NAME}@2.0.0"}
    for rid, model in asks.items():
        c.publish(
            "edge/sbs/infer", json.dumps({"request_id": rid, "model": model, "image_b64": image}).encode()
        )
    c.publish(f"edge/sbs/infer/{NAME}@1.0.0", json.dumps({"request_id": "t-v1", "image_b64": image}).encode())
    got = c.wait_for(lambda m: {"a-default", "a-v1", "a-v2", "t-v1"} <= {x.get("request_id") for x in m},
                     "edge/sbs/result", timeout=60)  # fmt: skip
    answers = {m["request_id"]: m for m in got}
    for rid, version, prefix in [("a-default", "2.0.0", "v200 "), ("a-v2", "2.0.0", "v200 "),
                                 ("a-v1", "1.0.0", ""), ("t-v1", "1.0.0", "")]:  # fmt: skip
        answer = answers[rid]
        assert answer.get("version") == version, answer
        label = answer["top"][0]["label"]
        assert label.startswith("v200 ") if prefix else not label.startswith("v200 "), answer
    c.publish(
        "edge/sbs/infer",
        json.dumps({"request_id": "a-v3", "model": f"{NAME}@3", "image_b64": image}).encode(),
    )
    refused = c.wait_for(lambda m: any(x.get("request_id") == "a-v3" for x in m), "edge/sbs/result")
    error = next(m for m in refused if m.get("request_id") == "a-v3")["error"]
    assert error["code"] == "unknown_model" and f"{NAME}@1.0.0" in error["message"], error

    telemetry = c.wait_for(lambda m: bool(m) and len(m[-1]["tenants"]) == 2, "edge/sbs/telemetry")[-1]
    rows = {t["model"]: t["version"] for t in telemetry["tenants"]}
    assert rows == {NAME: "2.0.0", f"{NAME}@1.0.0": "1.0.0"}, telemetry["tenants"]
    # The console's fleet row, from this status and telemetry: one line per tenant, by key.
    device = Device("sbs", 0.0, 0.0, status=Status.model_validate(status))
    device.telemetry = Telemetry.model_validate(telemetry)
    listed = {(t["model"], t["version"], t["fps"] is not None) for t in device.summary(0.0, 60.0)["tenants"]}
    assert listed == {(NAME, "2.0.0", True), (f"{NAME}@1.0.0", "1.0.0", True)}, listed

    # One version twice (the unpinned tenant serves 2.0.0): refused with the reason; both serve on.
    twice = {"generation": 2, "tenants": [{"model": NAME}, {"model": NAME, "version": "2.0.0"}]}
    c.publish("edge/sbs/placement", json.dumps(twice).encode(), retain=True)
    status = c.wait_for(
        lambda m: bool(m) and ((m[-1].get("placement") or {}).get("refused") or {}).get("generation") == 2,
        "edge/sbs/status",
    )[-1]
    assert "would both serve" in status["placement"]["refused"]["reason"], status["placement"]
    assert status["placement"]["applied_generation"] == 1 and len(status["placement"]["tenants"]) == 2

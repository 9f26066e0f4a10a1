"""Security against a real Mosquitto: TLS, mutual TLS, passwords, the shipped ACL, signed placements."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.devtools.local_broker import LocalBroker
from tests.conftest import CAT_CLASSES, REPO, AgentProcess, Collector, passwd_file, sample, wait_for_log
from tests.pki import make_pki

pytestmark = pytest.mark.timeout(180)
ACL = REPO / "deploy" / "mosquitto" / "edge-acl.conf"


def test_mutual_tls_and_password(shared_dir, tmp_path):
    pki = make_pki(shared_dir / "pki")
    pw = passwd_file(shared_dir, {"cam1": "s3cret", "tester": "t3st"})
    broker = LocalBroker(
        anonymous=False,
        extra_config=(
            f"password_file {pw}\ncafile {pki['ca']}\ncertfile {pki['server_cert']}\n"
            f"keyfile {pki['server_key']}\nrequire_certificate true\n"
        ),
    )
    config = (
        f'[broker]\nusername = "cam1"\npassword = "s3cret"\n[broker.tls]\nenabled = true\n'
        f'ca_file = "{pki["ca"]}"\ncert_file = "{pki["cam1_cert"]}"\nkey_file = "{pki["cam1_key"]}"\n'
    )
    with broker:
        broker.host = "127.0.0.1"
        agent = AgentProcess(broker, tmp_path, "cam1", config)
        agent.args[agent.args.index("--broker") + 1] = f"mqtts://127.0.0.1:{broker.port}"
        agent.start()
        tls = {"ca_certs": str(pki["ca"]), "certfile": str(pki["cam1_cert"]), "keyfile": str(pki["cam1_key"])}
        c = Collector(broker.port, ["edge/cam1/result", "edge/cam1/status"], "tester", "t3st", tls)
        try:
            c.wait_for(lambda r: bool(r) and r[-1].get("online") is True, "edge/cam1/status", timeout=60)
            c.publish("edge/cam1/infer", sample("cat.jpg"))
            got = c.wait_for(lambda r: len(r) >= 1, "edge/cam1/result")
            assert got[0]["top"][0]["index"] in CAT_CLASSES
            # The CLI talks to the same broker with the config's TLS files and credentials.
            cfg = tmp_path / "client.toml"
            cfg.write_text(config.replace('"cam1"', '"tester"').replace('"s3cret"', '"t3st"'))
            done = subprocess.run(
                [
                    agent.args[0],
                    "-m",
                    "agent",
                    "infer",
                    str(REPO / "agent/samples/espresso.jpg"),
                    "--config",
                    str(cfg),
                    "--broker",
                    f"mqtts://127.0.0.1:{broker.port}",
                    "--device-id",
                    "cam1",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert "espresso" in done.stdout
        finally:
            c.close()
            agent.stop()
        # Wrong password: the agent keeps retrying and says why; doctor reports it with a fix.
        bad = tmp_path / "bad.toml"
        bad.write_text(config.replace("s3cret", "wrong"))
        done = subprocess.run(
            [
                agent.args[0],
                "-m",
                "agent",
                "doctor",
                "--config",
                str(bad),
                "--broker",
                f"mqtts://127.0.0.1:{broker.port}",
                "--device-id",
                "cam1",
                "--state-dir",
                str(tmp_path / "d"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1
        assert "[FAIL] broker" in done.stdout and "refused" in done.stdout
        # No client certificate: the TLS handshake is refused.
        plain = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        plain.tls_set(ca_certs=str(pki["ca"]))
        plain.username_pw_set("tester", "t3st")
        outcome: list[str] = []  # what ended the attempt: waited for, not a fixed time
        plain.on_connect = lambda *args: outcome.append("accepted")
        plain.on_disconnect = lambda *args: outcome.append("dropped")
        try:
            plain.connect("127.0.0.1", broker.port)  # TLS 1.3: the broker's refusal comes after it
            deadline = time.monotonic() + 30
            while not outcome and time.monotonic() < deadline:
                if plain.loop(0.1) != paho.MQTT_ERR_SUCCESS:
                    outcome.append("dropped")
        except (OSError, ssl.SSLError) as exc:
            outcome.append(f"refused: {exc}")
        assert outcome, "the broker neither let the client in nor refused it"
        assert outcome[0] != "accepted", "a client without a certificate is not let in"


def _client(port: int, user: str, password: str) -> tuple[paho.Client, threading.Event]:
    """A connected client, and an Event set when the broker acknowledged its (one) subscription."""
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5, client_id=f"{user}-{os.getpid()}")
    c.username_pw_set(user, password)
    subscribed = threading.Event()
    c.on_subscribe = lambda *_: subscribed.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c, subscribed


def test_shipped_acl_keeps_devices_to_their_own_topics(shared_dir):
    acl = shared_dir / "acl"
    acl.write_text(ACL.read_text())
    acl.chmod(0o644)
    users = {"cam-01": "a", "cam-02": "b", "console": "c", "camera-cam-01": "d"}
    pw = passwd_file(shared_dir, users)
    with LocalBroker(anonymous=False, extra_config=f"password_file {pw}\nacl_file {acl}\n") as broker:
        got: dict[str, list[tuple[str, bytes]]] = {u: [] for u in users}
        cond = threading.Condition()

        def on_message(user: str, m: paho.MQTTMessage) -> None:
            with cond:
                got[user].append((m.topic, m.payload))
                cond.notify_all()

        clients = {}
        for user, password in users.items():
            c, subscribed = _client(broker.port, user, password)
            c.on_message = lambda _c, _u, m, user=user: on_message(user, m)
            c.subscribe("edge/#", qos=1)
            clients[user] = (c, subscribed)
        for user, (_c, subscribed) in clients.items():
            assert subscribed.wait(10), f"{user}: no SUBACK"

        def pub(user: str, topic: str, payload: bytes = b"{}") -> None:
            clients[user][0].publish(topic, payload, qos=1).wait_for_publish(5)

        pub("console", "edge/cam-01/placement")  # allowed: cam-01 reads it
        pub("cam-02", "edge/cam-01/placement")  # not allowed: only the console places
        pub("cam-01", "edge/cam-01/placement")  # not allowed either
        pub("cam-01", "edge/cam-01/result")  # allowed: camera and console? camera reads it
        pub("cam-02", "edge/cam-01/result")  # forging another device's results: refused
        pub("camera-cam-01", "edge/cam-01/infer")  # allowed
        pub("camera-cam-01", "edge/cam-02/infer")  # refused: not its device
        pub("cam-02", "edge/cam-02/status")  # allowed: console reads it
        # Every publish above was acknowledged, so Mosquitto (one thread) had already queued each of
        # them to its subscribers. A marker each subscriber may read, published now, is queued behind
        # them: once every subscriber has its marker, it has every message it will ever get above.
        markers = {
            "cam-01": ("console", "edge/cam-01/placement"),
            "cam-02": ("console", "edge/cam-02/placement"),
            "console": ("cam-02", "edge/cam-02/status"),
            "camera-cam-01": ("cam-01", "edge/cam-01/result"),
        }
        for publisher, topic in markers.values():
            pub(publisher, topic, b"marker")
        with cond:
            assert cond.wait_for(
                lambda: all((topic, b"marker") in got[user] for user, (_p, topic) in markers.items()), 10
            ), got
        for c, _subscribed in clients.values():
            c.loop_stop()
            c.disconnect()
    topics = {user: [t for t, payload in msgs if payload != b"marker"] for user, msgs in got.items()}
    assert topics["cam-01"].count("edge/cam-01/placement") == 1, topics["cam-01"]
    assert topics["cam-01"].count("edge/cam-01/infer") == 1
    assert "edge/cam-02/infer" not in topics["cam-02"], "a camera cannot feed another device"
    assert topics["camera-cam-01"] == ["edge/cam-01/result"], "one genuine result; the forged one was dropped"
    # The console reads status, telemetry and (its own) placements; never frames or results.
    assert sorted(topics["console"]) == ["edge/cam-01/placement", "edge/cam-02/status"]
    assert not any(t.startswith("edge/cam-01/") for t in topics["cam-02"]), "devices do not see each other"


MARKER = 999_999  # the generation of the unsigned marker document (see judged_after_restart)


def connects(agent: AgentProcess) -> int:
    """How often the agent has logged a completed (re)connect: every subscription acknowledged."""
    return agent.log().count("connected to mqtt")


def judged_after_restart(agent: AgentProcess, connects_before: int) -> dict:
    """Wait until the retained placement redelivered at this start has been judged; return a status
    made after that judgement.

    A redelivered, applied, signed document is a `Redelivery` (agent/placement/intake.py): the agent
    publishes and logs nothing for it, so its judgement leaves no trace to wait for. A marker does:
    the agent logs "connected to mqtt" only once every SUBSCRIBE has its SUBACK, and Mosquitto
    queued the retained copy to it while handling that SUBSCRIBE. An unsigned marker published after
    the line is therefore delivered behind the retained copy, and the reconciler judges documents in
    the order they arrive (Reconciler.submit/_apply_newest). The status reporting the marker's
    refusal was made after the retained copy's judgement; had that copy been refused (expired,
    replayed), its refusal would be in `errors` too.
    """
    wait_for_log(agent, "connected to mqtt", count=connects_before + 1)
    topic = f"edge/{agent.device_id}/status"
    c = Collector(agent.broker.port, [topic])
    try:
        marker = json.dumps({"generation": MARKER, "tenants": []}).encode()
        c.publish(f"edge/{agent.device_id}/placement", marker)  # not retained: only this start sees it

        def marker_refused(statuses: list[dict]) -> bool:
            refused = (statuses[-1].get("placement") or {}).get("refused") or {} if statuses else {}
            return refused.get("generation") == MARKER

        status = c.wait_for(marker_refused, topic, timeout=60)[-1]
    finally:
        c.close()
    refusals = [e for e in status["errors"] if "refused" in e]
    assert len(refusals) == 1 and "unsigned" in refusals[0], status["errors"]
    return status


def test_signed_placements_refuse_unsigned_forged_replayed_and_expired(broker, tmp_path):
    import asyncio

    from agent.commands.client import publish_placement
    from agent.protocol.signing import generate_keypair, load_private_key, sign

    private, public = generate_keypair(tmp_path)
    key = load_private_key(private)
    (tmp_path / "other").mkdir()
    other = load_private_key(generate_keypair(tmp_path / "other")[0])
    config = f'[security]\nplacement_public_key = "{public.read_text().strip()}"\n'
    agent = AgentProcess(broker, tmp_path, "sig1", config).start()
    agent.wait_ready()

    def doc(generation: int, backend: str = "openvino") -> dict:
        device = "CPU" if backend == "openvino" else "cpu"
        return {
            "generation": generation,
            "tenants": [{"model": "efficientnet-lite0", "backend": backend, "device": device}],
        }

    def send(document: dict) -> tuple[bool, dict]:
        return asyncio.run(publish_placement(broker.url, "sig1", document, timeout_s=30))

    try:
        applied, status = send(doc(1))
        assert not applied and "unsigned" in status["placement"]["refused"]["reason"]
        applied, status = send(sign(doc(2), other))
        assert not applied and "forged" in status["placement"]["refused"]["reason"]
        tampered = sign(doc(3), key)
        tampered["tenants"][0]["instances"] = 8
        applied, status = send(tampered)
        assert not applied and "altered" in status["placement"]["refused"]["reason"]
        expired = sign(doc(4), key, valid_s=-10)
        applied, status = send(expired)
        assert not applied and "expired" in status["placement"]["refused"]["reason"]
        good = sign(doc(5), key)
        applied, status = send(good)
        assert applied, status
        assert status["placement"]["tenants"][0]["backend"] == "openvino"
        older = sign(doc(3, "onnxruntime"), key)
        applied, status = send(older)
        assert not applied and "replayed" in status["placement"]["refused"]["reason"]
        replay = sign(doc(5, "onnxruntime"), key)
        applied, status = send(replay)
        assert not applied and "replayed" in status["placement"]["refused"]["reason"]
        # Through all that the signed placement kept serving.
        final = agent.wait_ready()
        assert [(t["backend"], t["state"]) for t in final["placement"]["tenants"]] == [("openvino", "ready")]
        assert json.loads((agent.state_dir / "placement.json").read_text())["generation"] == 5
        # The console re-publishes the applied document (retained), as after an operator's undo.
        asyncio.run(_publish_retained(broker.url, "edge/sig1/placement", json.dumps(good).encode()))
    finally:
        agent.stop()
    # A restart re-reads the saved, signed placement; its retained copy is not taken for a replay.
    before = connects(agent)
    agent.start()
    try:
        status = judged_after_restart(agent, before)
        assert status["placement"]["applied_generation"] == 5
        assert [(t["backend"], t["state"]) for t in status["placement"]["tenants"]] == [("openvino", "ready")]
    finally:
        agent.stop()


async def _publish_retained(url: str, topic: str, payload: bytes) -> None:
    from agent.commands.client import connect

    async with connect(url) as client:
        await client.publish(topic, payload, qos=1, retain=True)


def test_bad_public_key_is_a_config_error(tmp_path):
    import sys

    cfg = tmp_path / "agent.toml"
    cfg.write_text('[security]\nplacement_public_key = "not-a-key"\n')
    done = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(cfg), "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "placement_public_key" in done.stderr


def test_tampered_artifact_refused_previous_placement_keeps_serving(broker, tmp_path):
    import asyncio
    import shutil

    from agent.commands.client import publish_placement

    models = tmp_path / "models"
    shutil.copytree(REPO / "models" / "efficientnet-lite0", models / "efficientnet-lite0")
    agent = AgentProcess(broker, tmp_path, "tamper1", "", extra_args=["--models", str(models)]).start()
    agent.wait_ready()
    onnx = models / "efficientnet-lite0" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-16] + b"\0" * 16)  # someone swapped the weights on disk
    doc = {
        "generation": 1,
        "tenants": [{"model": "efficientnet-lite0", "backend": "openvino", "device": "CPU"}],
    }
    _applied, status = asyncio.run(publish_placement(broker.url, "tamper1", doc, timeout_s=60))
    tenants = {(t["backend"], t["state"]): t for t in status["placement"]["tenants"]}
    assert ("onnxruntime", "ready") in tenants, "the previous tenant keeps serving"
    assert "sha256" in tenants[("openvino", "failed")]["error"]
    c = Collector(broker.port, ["edge/tamper1/result"])
    try:
        c.publish("edge/tamper1/infer", sample("cat.jpg"))
        got = c.wait_for(lambda r: len(r) >= 1, "edge/tamper1/result")[0]
    finally:
        c.close()
        agent.stop()
    assert got["tenant"]["backend"] == "onnxruntime" and got["top"][0]["index"] in CAT_CLASSES


def test_an_applied_signed_placement_is_not_refused_after_it_expires(broker, tmp_path):
    """The retained, applied document comes back at every reconnect and restart; once its signature
    has expired that is still a redelivery, not a refusal (the console signs for an hour)."""
    import asyncio

    from agent.commands.client import publish_placement
    from agent.placement.intake import Applied, Intake, Refused
    from agent.protocol.signing import generate_keypair, load_private_key, load_public_key, sign

    private, public = generate_keypair(tmp_path)
    config = f'[security]\nplacement_public_key = "{public.read_text().strip()}"\n'
    agent = AgentProcess(broker, tmp_path, "sig2", config).start()
    agent.wait_ready()
    doc = {
        "generation": 1,
        "tenants": [{"model": "efficientnet-lite0", "backend": "openvino", "device": "CPU"}],
    }
    signed = sign(doc, load_private_key(private), valid_s=2)
    try:
        applied, status = asyncio.run(publish_placement(broker.url, "sig2", signed, timeout_s=60))
        assert applied, status
    finally:
        agent.stop()
    while time.time() <= signed["expires_at"] + 0.1:
        time.sleep(0.05)  # the signature expires while the agent is down (waits for the clock itself)
    # Now expired indeed: as a new document (nothing applied), intake refuses it for that.
    outcome = Intake(load_public_key(public.read_text())).check(json.dumps(signed).encode(), Applied())
    assert isinstance(outcome, Refused) and "expired" in outcome.reason, outcome
    before = connects(agent)
    agent.start()
    try:
        status = judged_after_restart(agent, before)
        assert status["placement"]["applied_generation"] == 1
        assert not [e for e in status["errors"] if "expired" in e], status["errors"]
        assert [(t["backend"], t["state"]) for t in status["placement"]["tenants"]] == [("openvino", "ready")]
    finally:
        agent.stop()


def test_a_signed_auto_placement_survives_a_restart(broker, tmp_path):
    """The saved copy keeps the document's signature and its "auto" (re-chosen from the cached
    profiles at start): the redelivered retained document is then recognised, not refused, and the
    status still explains the choice (the console tracks auto tenants by it)."""
    import asyncio

    from agent.commands.client import publish_placement
    from agent.protocol.signing import generate_keypair, load_private_key, sign

    private, public = generate_keypair(tmp_path)
    config = f'[security]\nplacement_public_key = "{public.read_text().strip()}"\n'
    agent = AgentProcess(broker, tmp_path, "sig3", config).start()
    agent.wait_ready()
    doc = {"generation": 1, "tenants": [{"model": "efficientnet-lite0", "backend": "auto", "device": "auto"}]}
    try:
        applied, status = asyncio.run(
            publish_placement(broker.url, "sig3", sign(doc, load_private_key(private)), timeout_s=120)
        )
        assert applied, status
        chosen = status["placement"]["tenants"][0]
        assert chosen["auto"] is not None and chosen["backend"] != "auto"
    finally:
        agent.stop()
    before = connects(agent)
    agent.start()
    try:
        agent.wait_ready(timeout=120)
        status = judged_after_restart(agent, before)
        assert status["placement"]["applied_generation"] == 1
        tenant = status["placement"]["tenants"][0]
        assert (tenant["backend"], tenant["auto"] is not None) == (chosen["backend"], True), tenant
    finally:
        agent.stop()


def test_devices_accept_a_small_set_of_keys_for_rotation(tmp_path):
    """Old and new key side by side (a rotation); a key left out is refused; the list is bounded."""
    from agent.placement.intake import Accepted, Applied, Intake, Refused
    from agent.protocol.signing import (
        MAX_PUBLIC_KEYS,
        generate_keypair,
        load_private_key,
        load_public_keys,
        sign,
    )
    from agent.service.config import AgentConfig

    pairs = []
    for name in ("old", "new", "retired"):
        (tmp_path / name).mkdir()
        private, public = generate_keypair(tmp_path / name)
        pairs.append((load_private_key(private), public.read_text().strip()))
    (old, old_pub), (new, new_pub), (retired, retired_pub) = pairs
    keyfile = tmp_path / "keys.pub"
    keyfile.write_text(f"# placement keys, one per line\n{old_pub}\n\n{new_pub}\n")
    for form in ([old_pub, new_pub], str(keyfile)):
        intake = Intake(load_public_keys(form), max_age_s=3600)
        doc = {"generation": 1, "tenants": [{"model": "efficientnet-lite0"}]}
        for generation, key in ((1, old), (2, new)):
            outcome = intake.check(
                json.dumps(sign({**doc, "generation": generation}, key)).encode(), Applied()
            )
            assert isinstance(outcome, Accepted), outcome
        refused = intake.check(json.dumps(sign({**doc, "generation": 3}, retired)).encode(), Applied())
        assert isinstance(refused, Refused) and "forged" in refused.reason
    with pytest.raises(ValueError, match="at most"):
        load_public_keys([new_pub] * (MAX_PUBLIC_KEYS + 1))
    with pytest.raises(ValueError, match="key 2"):
        load_public_keys([new_pub, "not-a-key"])
    # The single-key form still works, and an empty list is not taken for "no signatures needed".
    assert (
        AgentConfig(security={"placement_public_key": retired_pub}).security.placement_public_key
        == retired_pub
    )
    with pytest.raises(ValueError, match="1 to 8"):
        AgentConfig(security={"placement_public_key": []})


def test_console_refuses_to_start_with_unusable_signing_or_tls_files(tmp_path, capsys):
    from cloud_console import cli

    base = ["serve", "--db", str(tmp_path / "c.db"), "--demo-users", "admin=pw-123456,viewer=pw-123456"]
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not a key")
    assert cli.main([*base, "--broker", "mqtt://127.0.0.1:1", "--sign-key", str(bad_key)]) == 2
    assert "signing key" in capsys.readouterr().err
    pki = make_pki(tmp_path / "pki", clients=("console",))
    cert = ["--cert-file", str(pki["console_cert"]), "--key-file", str(pki["console_key"])]
    assert cli.main([*base, "--broker", "mqtt://127.0.0.1:1", *cert]) == 2  # a certificate needs mqtts://
    assert "use mqtts://" in capsys.readouterr().err
    assert (
        cli.main([*base, "--broker", "mqtts://127.0.0.1:1", "--ca-file", str(tmp_path / "missing.pem")]) == 2
    )
    assert "TLS files" in capsys.readouterr().err


def test_simulated_fleet_connects_to_a_mutual_tls_broker(shared_dir, tmp_path):
    """`edge-console simulate` takes the TLS flags the console takes, so a secured broker can be load-tested."""
    pki = make_pki(shared_dir / "pki", clients=("sim",))
    pw = passwd_file(shared_dir, {"sim": "s1m", "tester": "t3st"})
    broker = LocalBroker(
        anonymous=False,
        extra_config=(
            f"password_file {pw}\ncafile {pki['ca']}\ncertfile {pki['server_cert']}\n"
            f"keyfile {pki['server_key']}\nrequire_certificate true\n"
        ),
    )
    with broker:
        topics = [f"edge/simtls-{i:04d}/status" for i in range(3)]
        tls = {"ca_certs": str(pki["ca"]), "certfile": str(pki["sim_cert"]), "keyfile": str(pki["sim_key"])}
        c = Collector(broker.port, topics, "tester", "t3st", tls)
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cloud_console",
                "simulate",
                "--broker",
                f"mqtts://sim:s1m@127.0.0.1:{broker.port}",
                "--ca-file",
                str(pki["ca"]),
                "--cert-file",
                str(pki["sim_cert"]),
                "--key-file",
                str(pki["sim_key"]),
                "--devices",
                "3",
                "--id-prefix",
                "simtls",
                "--duration",
                "120",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            for topic in topics:
                got = c.wait_for(lambda r: bool(r) and r[-1].get("online") is True, topic, timeout=60)
                assert got[-1]["device_id"] == topic.split("/")[1]
        finally:
            sim.terminate()
            out, _ = sim.communicate(timeout=30)
            c.close()
        assert "s1m" not in out, "the broker password is never printed"

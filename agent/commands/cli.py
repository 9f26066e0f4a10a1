"""`edge-agent`: run the agent, talk to one, or show the demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

from agent import __version__
from agent.protocol.topics import POOL_NAME_RE, valid_pool_name
from agent.service.config import AgentConfig, ConfigError, load_config
from agent.service.logs import setup_logging

EXIT_CONFIG = 2
log = logging.getLogger("agent")


def _config_from_args(args: argparse.Namespace) -> AgentConfig:
    overrides: dict[str, Any] = {
        "device_id": getattr(args, "device_id", None),
        "state_dir": getattr(args, "state_dir", None),
        "models_dir": getattr(args, "models", None),
        "log_level": getattr(args, "log_level", None),
    }
    return load_config(args.config, overrides=overrides, broker_url=getattr(args, "broker", None))


def _check_dirs(config: AgentConfig) -> None:
    """A state dir the agent cannot use, or no model repository: a config error (exit 2, one line),
    not a traceback and a systemd restart loop."""
    state = config.state_dir
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"state_dir {state}: cannot create it: {exc.strerror or exc}") from exc
    if not os.access(state, os.W_OK | os.X_OK):
        raise ConfigError(f"state_dir {state}: not writable by this user (uid {os.getuid()})")
    if not config.models_dir.is_dir():
        raise ConfigError(f"models_dir {config.models_dir}: no such folder (the model repository)")


def cmd_run(args: argparse.Namespace) -> int:
    from agent.service.daemon import Agent, apply_cpu_policy

    config = _config_from_args(args)
    _check_dirs(config)
    setup_logging(config.log_level)
    apply_cpu_policy(config.scheduler.cpu_policy)  # before any thread starts: they all inherit it
    log.info(
        "edge-agent %s starting as device %s (broker %s:%d)",
        __version__,
        config.device_id,
        config.broker.host,
        config.broker.port,
    )

    agent = Agent(config)  # raises ConfigError (exit 2) for a bad signing key

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    asyncio.run(main())
    return 0


class Target(NamedTuple):
    """Where a client command talks to its device: everything from the agent's own config."""

    url: str  # with the config's credentials
    device_id: str
    tls: ssl.SSLContext | None
    prefix: str  # broker.topic_prefix
    user: str | None


def _device_args(args: argparse.Namespace) -> Target:
    """The broker URL (with the config's credentials), device id, TLS context and topic prefix for
    client commands: the same config as the agent's, so they reach it on a secured broker."""
    from agent.service.mqtt_session import build_tls_context

    config = _config_from_args(args)
    pool = getattr(args, "pool", None)
    if pool is not None and not (valid_pool_name(pool) and args.model):
        raise ConfigError(f"--pool {pool!r}: needs --model, and a name matching {POOL_NAME_RE.pattern}")
    b = config.broker
    args.protocol = b.protocol  # broker.protocol: "auto" falls back to 3.1.1 as the agent does
    scheme = "mqtts" if b.tls.enabled else "mqtt"
    auth = f"{quote(b.username)}:{quote(b.password or '')}@" if b.username else ""
    url = f"{scheme}://{auth}{b.host}:{b.port}"
    return Target(url, config.device_id, build_tls_context(b), b.topic_prefix, b.username)


def cmd_infer(args: argparse.Namespace) -> int:
    from agent.commands.client import InferClient

    url, device_id, tls, prefix, _user = _device_args(args)
    images = [Path(p) for p in args.images]
    for path in images:
        if not path.is_file():
            print(f"error: {path} is not a file", file=sys.stderr)
            return EXIT_CONFIG

    async def run() -> int:
        failures = 0
        async with InferClient(url, device_id, prefix, tls, args.protocol, args.pool) as client:
            for path in images:
                try:
                    reply = await client.infer(path.read_bytes(), args.model, args.timeout, args.retries)
                except TimeoutError:
                    print(f"{path.name}: no answer within {args.timeout}s (is the agent running?)")
                    failures += 1
                    continue
                if args.json:
                    print(json.dumps(reply.payload))
                elif reply.ok:
                    best = reply.best
                    print(
                        f"{path.name:24s} {best['label']:24s} {best['score']:6.3f}  "
                        f"{reply.latency_ms:7.1f} ms  ({reply.payload['model']})"
                    )
                    for line in reply.boxes:  # a cascade: each box with its class
                        print(line)
                else:
                    err = reply.payload["error"]
                    print(f"{path.name:24s} error {err['code']}: {err['message']}")
                    failures += 1
        return 1 if failures else 0

    return asyncio.run(run())


def cmd_camera(args: argparse.Namespace) -> int:
    import time

    from agent.commands.camera import CameraRun, SourceError, run_camera, summary

    logging.basicConfig(level=logging.WARNING, format="camera: %(message)s", stream=sys.stderr)
    target = _device_args(args)
    run = CameraRun.from_args(args, target.url, target.device_id, target.tls, target.prefix)
    started = time.monotonic()
    try:
        counts = run_camera(run)
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(summary(counts, time.monotonic() - started), file=sys.stderr)
    return 0 if counts.answered and not counts.errors and not counts.lost else 1


def cmd_status(args: argparse.Namespace) -> int:
    from agent.commands.client import read_retained
    from agent.protocol.topics import Topics

    target = _device_args(args)
    topic = Topics(target.device_id, target.prefix).status
    status = asyncio.run(read_retained(target.url, topic, args.timeout, target.tls, args.protocol))
    if status is None:
        # Mosquitto grants a subscription its ACL does not allow and then delivers nothing: both
        # causes look the same from here.
        print(
            f"no status on {topic} within {args.timeout:g} s: the agent has never connected to this "
            f"broker, or the broker's ACL does not let user {target.user or '(anonymous)'} read "
            "that topic (docs/security.md#broker-acl)",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(status, indent=2))
    return 0 if status.get("online") else 1


def cmd_place(args: argparse.Namespace) -> int:
    from agent.commands.client import publish_placement, read_retained
    from agent.protocol import editing
    from agent.protocol.schemas import Placement, Status
    from agent.protocol.topics import Topics

    url, device_id, tls, prefix, _user = _device_args(args)
    topics = Topics(device_id, prefix)
    status = asyncio.run(read_retained(url, topics.status, 5.0, tls, args.protocol)) or {}
    try:  # the same editing rules as the console's (agent.protocol.editing)
        reported = Status.model_validate(status) if status else None
    except ValueError:
        reported = None  # not an agent's status: start from nothing
    if args.file:
        try:
            doc = json.loads(Path(args.file).read_text())
        except (OSError, ValueError) as exc:
            print(f"error: {args.file}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    else:
        if not args.model:
            print("error: give --file or --model", file=sys.stderr)
            return EXIT_CONFIG
        others, failed = editing.without_failed(editing.current_tenants(reported, None), reported)
        dropped = [m for m in failed if m != args.model]
        if dropped:
            print(f"not carried over (they failed to start): {', '.join(dropped)}")
        keep = [t.model_dump(exclude_none=True) for t in others if t.model != args.model]
        tenant: dict[str, Any] = {
            "model": args.model,
            "backend": args.backend,
            "device": args.device,
            "instances": args.instances,
        }
        if args.pool:  # a device pool (docs/pools.md)
            tenant["pool"] = args.pool
        if args.batch_size:
            tenant["batch"] = {"max_size": args.batch_size, "max_delay_ms": args.max_delay_ms}
        if version := args.model_version:  # the device refuses a version it lacks (docs/fleet.md)
            tenant["version"] = version
            caps = reported.capabilities if reported else None
            have = [
                v.version
                for m in (caps.installed if caps else [])
                if m.name == args.model
                for v in m.versions
            ]
            if have and version not in have:
                hint = f"edge-console models deliver {device_id} {args.model} --version {version}"
                print(f"note: {device_id} has {args.model} {', '.join(have)}, not {version}; first: {hint}")
        if args.candidates:  # backend:device,... in order of preference; the first one serves
            pairs = [c.strip().partition(":") for c in args.candidates.split(",") if c.strip()]
            tenant["candidates"] = [{"backend": b, "device": d or "cpu"} for b, _, d in pairs]
            del tenant["backend"], tenant["device"]
        doc = {"tenants": [*keep, tenant]}
    if "generation" not in doc or args.generation is not None:
        default = editing.next_generation(reported, None)
        doc["generation"] = args.generation if args.generation is not None else default
    try:
        Placement.model_validate(doc)
    except ValueError as exc:
        print(f"error: invalid placement: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.sign_key:
        from agent.protocol.signing import load_private_key, sign

        try:
            key = load_private_key(Path(args.sign_key))
        except (OSError, ValueError) as exc:
            print(f"error: --sign-key {args.sign_key}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        doc = sign(doc, key, valid_s=args.valid_s)
    print(f"publishing placement generation {doc['generation']} to {topics.placement}")
    applied, status = asyncio.run(
        publish_placement(url, device_id, doc, args.timeout, prefix, tls, args.protocol)
    )
    placement = status.get("placement") or {}
    if applied:
        placed = {args.model} if not args.file else {t.get("model") for t in doc.get("tenants", [])}
        failed = []
        for t in placement.get("tenants", []):
            extra = f" ({t['error']})" if t.get("error") else ""
            print(f"  {t['model']:20s} {t['backend']}:{t['device']} x{t['instances']}  {t['state']}{extra}")
            if t.get("state") == "failed" and t["model"] in placed:
                failed.append(t["model"])
        if failed:
            # The agent applied the document, but a tenant in it did not start (an old one, if any,
            # keeps serving that model): not a success for whoever asked.
            print(f"applied generation {doc['generation']}, but failed to start: {', '.join(failed)}")
            return 1
        print(f"applied generation {doc['generation']}")
        return 0
    refused = placement.get("refused") or {}
    if refused.get("generation") == doc["generation"]:
        print(f"refused: {refused.get('reason')}")
    else:
        print(f"no answer from {device_id} within {args.timeout}s (is it online?)")
    return 1


def cmd_keygen(args: argparse.Namespace) -> int:
    from agent.protocol.signing import generate_keypair

    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    private, public = generate_keypair(folder)
    print(
        f"private key (keep it with whoever publishes placements: `edge-agent place --sign-key`): {private}"
    )
    print(f"public key (for every device's security.placement_public_key): {public.read_text().strip()}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent.commands import doctor

    try:
        config = _config_from_args(args)
    except ConfigError as exc:
        print(f"[FAIL] config: {exc}")
        return EXIT_CONFIG
    return doctor.run(config, skip_broker=args.no_broker)


def cmd_backends(args: argparse.Namespace) -> int:
    from agent.service.capabilities import probe_backends

    for name, cap in probe_backends().items():  # in a child, as the agent does
        state = "available" if cap.available else "unavailable"
        detail = ", ".join(cap.devices) if cap.available else cap.reason
        print(f"{name:14s} {state:12s} {detail}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from agent.commands import model_admin

    config = _config_from_args(args)
    return model_admin.run(args, config.models_dir, config.versions_dir)


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.devtools.demo import run_demo

    keep = True if args.keep_running else (False if args.exit else None)
    return run_demo(keep_running=keep, instances=args.instances)


def cmd_bench(argv: list[str]) -> int:
    """The benchmark is a dev tool, loaded only when called: nothing on the `run` path imports bench/."""
    from bench.cli import main as bench_main

    return bench_main(argv, prog="edge-agent bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config", type=Path, help="TOML config (default /etc/edge-agent/agent.toml if present)"
        )
        p.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT")
        p.add_argument("--device-id", help="device id (default: the hostname)")

    run = sub.add_parser("run", help="run the agent")
    common(run)
    run.add_argument("--state-dir", type=Path, help="where metrics.db and the saved placement live")
    run.add_argument("--models", type=Path, help="model repository folder")
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(func=cmd_run)

    infer = sub.add_parser("infer", help="send images to an agent and print its answers")
    common(infer)
    infer.add_argument("images", nargs="+")
    infer.add_argument("--model", help="model name (default: the agent's default model)")
    infer.add_argument("--timeout", type=float, default=30.0)
    infer.add_argument("--retries", type=int, default=0, help="send again (same id) after a timeout")
    infer.add_argument("--json", action="store_true", help="print the raw result JSON")
    infer.set_defaults(func=cmd_infer)

    camera = sub.add_parser(
        "camera", help="frames from a camera, RTSP/MJPEG stream or video file to an agent; print answers"
    )
    common(camera)
    camera.add_argument("source", help="/dev/video0 (or 0), rtsp://..., http(s)://... MJPEG, or a file")
    camera.add_argument("--model", help="model name (default: the agent's default model)")
    camera.add_argument("--fps", type=float, help="frames per second at most (default: as answered)")
    camera.add_argument("--frames", type=int, help="stop after this many answers (default: run on)")
    camera.add_argument("--max-in-flight", type=int, default=2, help="frames awaiting an answer")
    camera.add_argument("--short-side", type=int, help="shrink frames to this (default: from the model)")
    camera.add_argument("--models", type=Path, help="model repository (for the model's input size)")
    camera.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for one answer")
    camera.add_argument("--retries", type=int, default=1, help="send again (same id) after a timeout")
    for p in (infer, camera):
        p.add_argument("--pool", help="send to this device pool, not the device (docs/pools.md)")
    camera.add_argument("--json", action="store_true", help="one JSON line per answer")
    camera.set_defaults(func=cmd_camera)

    status = sub.add_parser("status", help="print an agent's retained status")
    common(status)
    status.add_argument("--timeout", type=float, default=5.0)
    status.set_defaults(func=cmd_status)

    place = sub.add_parser("place", help="publish a placement and wait until it is applied or refused")
    common(place)
    place.add_argument("--file", help="a placement JSON document")
    place.add_argument("--model")
    place.add_argument("--backend", default="onnxruntime", help="backend name, or auto")
    place.add_argument("--device", default="cpu")
    place.add_argument("--instances", type=int, default=1)
    place.add_argument("--model-version", help="the model version to serve (default: the newest installed)")
    place.add_argument(
        "--candidates",
        help="fallback places in order, e.g. openvino:GPU,onnxruntime:cpu (instead of --backend/--device)",
    )
    place.add_argument("--pool", help="also serve the model's frames sent to this pool (docs/pools.md)")
    place.add_argument("--batch-size", type=int)
    place.add_argument(
        "--max-delay-ms", type=float, default=0.0, help="batch wait (0: batch what is queued; best on CPUs)"
    )
    place.add_argument("--generation", type=int, help="default: one above the device's current")
    place.add_argument("--timeout", type=float, default=120.0)
    place.add_argument("--sign-key", help="Ed25519 private key (PEM) to sign the placement with")
    place.add_argument(
        "--valid-s", type=float, default=3600.0, help="how long a signed placement stays valid"
    )
    place.set_defaults(func=cmd_place)

    doctor = sub.add_parser(
        "doctor", help="check config, broker, models, backends, permissions; say what to fix"
    )
    common(doctor)
    doctor.add_argument("--state-dir", type=Path)
    doctor.add_argument("--models", type=Path)
    doctor.add_argument("--no-broker", action="store_true", help="skip the broker check")
    doctor.set_defaults(func=cmd_doctor)

    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair for signed placements")
    keygen.add_argument("--out", required=True, help="folder for the key pair")
    keygen.set_defaults(func=cmd_keygen)

    from agent.commands.model_admin import add_parser as add_models_parser

    add_models_parser(sub).set_defaults(func=cmd_models)

    backends = sub.add_parser("backends", help="list inference runtimes and devices on this machine")
    backends.set_defaults(func=cmd_backends)

    demo = sub.add_parser("demo", help="private broker + agent + sample photos, results shown")
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="leave broker, agent and console up until Ctrl-C (the default in a terminal)",
    )
    demo.add_argument(
        "--exit", action="store_true", help="stop after showing the results, even in a terminal"
    )
    demo.add_argument("--instances", type=int, default=2)
    demo.set_defaults(func=cmd_demo)
    bench = sub.add_parser(
        "bench",
        add_help=False,  # its options (and --help) belong to bench.cli, parsed when it runs
        help="concurrency benchmark: raw runtime vs pipeline vs MQTT vs naive (`edge-agent bench --help`)",
    )
    bench.set_defaults(func=lambda _args: cmd_bench([]))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its options are bench.cli's own
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # The client commands (infer, status, place) reach a broker: say so in one line, not a traceback.
        from agent.protocol.broker import redact_url
        from agent.protocol.connection import Refused

        if isinstance(exc, Refused):  # an ACL: the topic and the broker's reason, at once
            print(f"edge-agent: {exc}", file=sys.stderr)
            return 1
        if args.command in ("infer", "status", "place", "camera") and _is_connection_error(exc):
            where = redact_url(getattr(args, "broker", None) or "the configured broker")
            print(
                f"edge-agent: cannot talk to the broker at {where}: {redact_url(str(exc))} "
                "(is it running, and is it mqtt:// or mqtts://? `edge-agent doctor` checks)",
                file=sys.stderr,
            )
            return 1
        raise


def _is_connection_error(exc: BaseException) -> bool:
    """Reaching the broker failed (not, say, a CA file that does not exist: that traceback stays)."""
    import socket

    import aiomqtt

    return isinstance(exc, (aiomqtt.MqttError, ConnectionError, socket.gaierror, ssl.SSLError, TimeoutError))

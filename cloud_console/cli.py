"""`edge-console`: serve the web console, simulate a fleet, hash a password.

    edge-console serve --broker mqtt://HOST:PORT [--listen 127.0.0.1:8080] [--db console.db]
                       [--config console.toml] [--shared-group NAME] [--demo-users [admin=PW,viewer=PW]]
    edge-console simulate --broker mqtt://HOST:PORT --devices 500 [--interval 2]
    edge-console hash-password            (prompts; or --stdin)

`edge-console --broker ...` without a command means `serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from cloud_console.auth import hash_password
from cloud_console.config import (
    ConsoleConfig,
    ConsoleConfigError,
    UserConfig,
    load_console_config,
    parse_broker_url,
    parse_listen,
)

EXIT_CONFIG = 2
COMMANDS = ("serve", "simulate", "hash-password")
log = logging.getLogger("cloud_console")


def setup_logging(level: str) -> None:
    # Under systemd, journald adds timestamps: print level and logger only.
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("aiomqtt").setLevel(max(logging.getLevelName(level), logging.INFO))


def parse_demo_users(spec: str) -> dict[str, str]:
    """`random` or `admin=PW,viewer=PW` -> {role: password}."""
    if spec == "random":
        return {"admin": secrets.token_urlsafe(9), "viewer": secrets.token_urlsafe(9)}
    out: dict[str, str] = {}
    for part in spec.split(","):
        name, sep, password = part.partition("=")
        if not sep or name not in ("admin", "viewer") or not password:
            raise ConsoleConfigError(f"--demo-users {spec!r}: expected admin=PASSWORD,viewer=PASSWORD")
        out[name] = password
    return out


def build_config(args: argparse.Namespace) -> tuple[ConsoleConfig, dict[str, str]]:
    """The file, then the flags on top. Returns the config and any demo passwords to print."""
    config = load_console_config(args.config)
    updates: dict[str, object] = {}
    if args.shared_group is not None:
        updates["shared_group"] = args.shared_group
    broker = config.broker.model_copy(update={"url": args.broker} if args.broker else {})
    parse_broker_url(broker.url)  # fail now on a bad URL
    web = config.web.model_copy(update={"listen": args.listen} if args.listen else {})
    parse_listen(web.listen)
    storage = config.storage.model_copy(update={"db": args.db} if args.db else {})
    demo: dict[str, str] = {}
    users = list(config.users)
    if args.demo_users:
        taken = {u.name for u in users}  # a configured user of the same name wins
        demo = {role: pw for role, pw in parse_demo_users(args.demo_users).items() if role not in taken}
        users += [
            UserConfig(name=role, password_hash=hash_password(pw), role=role)  # type: ignore[arg-type]
            for role, pw in demo.items()
        ]
    try:
        config = ConsoleConfig.model_validate(
            {
                **config.model_dump(),
                **updates,
                "broker": broker.model_dump(),
                "web": web.model_dump(),
                "storage": storage.model_dump(),
                "users": [u.model_dump() for u in users],
            }
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConsoleConfigError(f"invalid option: {problems}") from exc
    if not config.users:
        raise ConsoleConfigError(
            "no users: add [[users]] (name, password_hash from `edge-console hash-password`, role) "
            "to the config file, or pass --demo-users"
        )
    return config, demo


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown (exit status -15). A stop asked for
        by systemd or Ctrl-C is a clean exit for the console: status 0."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    from cloud_console.app import create_app
    from cloud_console.service import Console

    config, demo = build_config(args)
    setup_logging(args.log_level)
    host, port = parse_listen(config.web.listen)
    console = Console(config)
    app = create_app(console)
    for role, password in demo.items():
        print(f"edge-console: demo user {role} password {password} (role {role})", flush=True)
    print(
        f"edge-console: serving http://{host}:{port}/ (broker {config.broker.url}, db {config.storage.db});"
        f" ready when GET /healthz answers",
        flush=True,
    )
    server = Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,  # event streams never end by themselves
            proxy_headers=False,
        )
    )
    asyncio.run(server.serve())
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    if args.stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("error: the passwords differ", file=sys.stderr)
            return 1
    if len(password) < 8:
        print("error: use at least 8 characters", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from cloud_console.simulator import FleetSimulator

    setup_logging(args.log_level)
    address = parse_broker_url(args.broker)
    sim = FleetSimulator(
        address.host,
        address.port,
        args.devices,
        interval_s=args.interval,
        per_connection=args.per_connection,
        id_prefix=args.id_prefix,
        seed=args.seed,
        username=address.username,
        password=address.password,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    sim.start()
    print(
        f"edge-console simulate: {args.devices} devices on {len(sim.connections)} connection(s),"
        f" telemetry every {args.interval}s ({sim.expected_rate():.0f} msg/s)",
        flush=True,
    )
    started = time.monotonic()
    last = (started, 0)
    while not stop.wait(10.0 if not args.duration else min(10.0, args.duration)):
        now = time.monotonic()
        rate = (sim.telemetry_sent - last[1]) / (now - last[0])
        last = (now, sim.telemetry_sent)
        print(
            f"edge-console simulate: {rate:.0f} telemetry/s, {sim.status_sent} statuses,"
            f" {sim.placements_seen} placements received",
            flush=True,
        )
        if args.duration and now - started >= args.duration:
            break
    sim.stop(clear=args.clear_on_exit)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-console", description="The edge-agent fleet console.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the web console")
    serve.add_argument("--broker", help="mqtt://HOST:PORT (default: the config's, else localhost:1883)")
    serve.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:8080)")
    serve.add_argument("--db", type=Path, help="SQLite file of fleet history (default console.db)")
    serve.add_argument("--config", type=Path, help="console TOML file (users, broker, web, storage)")
    serve.add_argument(
        "--shared-group", help="share telemetry with other workers: $share/NAME/edge/+/telemetry"
    )
    serve.add_argument(
        "--demo-users",
        nargs="?",
        const="random",
        metavar="admin=PW,viewer=PW",
        help="add users admin and viewer (random passwords unless given), printed at start",
    )
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=cmd_serve)

    simulate = sub.add_parser("simulate", help="run a fleet of fake agents against a broker")
    simulate.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    simulate.add_argument("--devices", type=int, default=50)
    simulate.add_argument("--interval", type=float, default=2.0, help="telemetry interval, seconds")
    simulate.add_argument("--per-connection", type=int, default=100, help="devices per MQTT connection")
    simulate.add_argument("--id-prefix", default="sim")
    simulate.add_argument("--seed", type=int, default=1)
    simulate.add_argument("--duration", type=float, default=0.0, help="seconds (0: until Ctrl-C)")
    simulate.add_argument("--clear-on-exit", action="store_true", help="clear retained topics at exit")
    simulate.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    simulate.set_defaults(func=cmd_simulate)

    hashpw = sub.add_parser("hash-password", help="print a password hash for [[users]] password_hash")
    hashpw.add_argument("--stdin", action="store_true", help="read the password from stdin")
    hashpw.set_defaults(func=cmd_hash_password)

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConsoleConfigError as exc:
        print(f"edge-console: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`edge-console`: serve the web console, simulate a fleet, hash a password.

    edge-console serve --broker mqtt://HOST:PORT [--listen 127.0.0.1:8080] [--db console.db]
                       [--config console.toml] [--shared-group NAME] [--demo-users [admin=PW,viewer=PW]]
                       [--sign-key FILE] [--ca-file CA] [--cert-file CERT --key-file KEY]
    edge-console simulate --broker mqtt://HOST:PORT --devices 500 [--interval 2]
                          [--ca-file CA] [--cert-file CERT --key-file KEY]
    edge-console hash-password            (prompts; or --stdin)
    edge-console token create --user NAME --name LABEL [--role viewer]   (prints the token once)
    edge-console token list | token revoke ID          (each takes --config / --db)
    edge-console models upload DIR | list | delete NAME VERSION | deliver DEVICE NAME   (docs/fleet.md)
    edge-console rollout create|status|pause|resume|approve|abort|rollback|tags   (docs/fleet.md#rollouts)

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

from agent.protocol.broker import BrokerUrlError, client_tls
from cloud_console import models_cli, rollout_cli
from cloud_console.auth import hash_password
from cloud_console.config import (
    BrokerSettings,
    ConsoleConfig,
    ConsoleConfigError,
    UserConfig,
    broker_flag,
    broker_shown,
    load_console_config,
    parse_broker_url,
    parse_listen,
)

EXIT_CONFIG = 2
COMMANDS = ("serve", "simulate", "hash-password", "token", "models", "rollout")
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
    broker_flags: dict[str, object] = {"ca_file": args.ca_file, "cert_file": args.cert_file}
    broker_flags["key_file"] = args.key_file
    if args.broker is not None:  # one URL, or the nodes of a cluster (`a,b`): replaces the file's
        broker_flags.update(broker_flag(args.broker))
    broker = config.broker.model_copy(update={k: v for k, v in broker_flags.items() if v is not None})
    try:
        broker = BrokerSettings.model_validate(broker.model_dump())
    except ValidationError as exc:
        problems = "; ".join(f"broker.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConsoleConfigError(f"invalid option: {problems}") from exc
    addresses = broker.addresses()  # fail now on a bad URL
    from cloud_console.mqtt import build_tls_context

    try:  # and on unusable TLS files (the agent's rules: agent.protocol.broker)
        build_tls_context(addresses[0], broker)
    except BrokerUrlError as exc:
        raise ConsoleConfigError(f"broker: {exc}") from exc
    signing = config.signing.model_copy(
        update={k: v for k, v in {"key_file": args.sign_key, "valid_s": args.sign_valid_s}.items() if v}
    )
    web = config.web.model_copy(update={"listen": args.listen} if args.listen else {})
    parse_listen(web.listen)
    storage_flags = {"db": args.db, "database": getattr(args, "database", None)}
    storage = config.storage.model_copy(update={k: v for k, v in storage_flags.items() if v})
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
                "signing": signing.model_dump(),
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
    from cloud_console.db import database_url, redacted
    from cloud_console.service import Console

    config, demo = build_config(args)
    setup_logging(args.log_level)
    host, port = parse_listen(config.web.listen)
    console = Console(config)  # raises ConsoleConfigError (exit 2) for an unusable signing key
    signing = f"signed with {config.signing.key_file}" if config.signing.key_file else "unsigned"
    app = create_app(console)
    for role, password in demo.items():
        print(f"edge-console: demo user {role} password {password} (role {role})", flush=True)
    print(
        f"edge-console: serving http://{host}:{port}/ (broker {broker_shown(config.broker)},"
        f" db {redacted(database_url(config.storage.url()))},"
        f" placements {signing});"
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


def cmd_token(args: argparse.Namespace) -> int:
    """Make, list or revoke API tokens in the console's database (the config's, or --db)."""
    from cloud_console.tokens import ROLE_RANK, TokenError, TokenStore

    config = load_console_config(args.config)
    store = TokenStore(args.database or args.db or config.storage.url())
    users = {u.name: u for u in config.users}
    try:
        if args.action == "create":
            user = users.get(args.user)
            if user is None and args.config is not None:
                raise ConsoleConfigError(f"no user {args.user!r} in {args.config}")
            role = args.role or (user.role if user else "viewer")
            if user is not None and ROLE_RANK[role] > ROLE_RANK[user.role]:
                raise ConsoleConfigError(f"{args.user} is a {user.role}: a token cannot have the {role} role")
            token, row = store.create(args.user, role, args.name)
            print(token)
            print(
                f"token {row['id']} for {row['user']} (role {row['role']}): shown this once, only its"
                " hash is kept; send it as 'Authorization: Bearer <token>'",
                file=sys.stderr,
            )
        elif args.action == "list":
            rows = store.list(args.user)
            print(f"{'id':16}  {'user':16} {'role':6} {'created':20} {'last used':20} {'revoked':20} name")
            for r in rows:
                print(
                    f"{r['id']:16}  {r['user']:16} {r['role']:6} {_when(r['created']):20}"
                    f" {_when(r['last_used']):20} {_when(r['revoked']):20} {r['name']}"
                )
        else:
            if not store.revoke(args.id):
                print(f"error: no token {args.id!r}", file=sys.stderr)
                return 1
            print(f"token {args.id} revoked")
    except TokenError as exc:
        raise ConsoleConfigError(str(exc)) from exc
    finally:
        store.close()
    return 0


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "-"


def cmd_simulate(args: argparse.Namespace) -> int:
    from cloud_console.simulator import FleetSimulator, SimFault

    setup_logging(args.log_level)
    address = parse_broker_url(args.broker)
    try:  # the agent's TLS rules (agent.protocol.broker): mqtts:// uses the system CAs unless --ca-file
        tls = client_tls(address, args.ca_file, args.cert_file, args.key_file, args.tls_insecure)
    except BrokerUrlError as exc:
        print(f"edge-console simulate: {exc}", file=sys.stderr)
        return 2
    try:
        faults = tuple(SimFault.parse(f) for f in args.fault)
    except ValueError as exc:
        print(f"edge-console simulate: {exc}", file=sys.stderr)
        return 2
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
        tls_context=tls,
        faults=faults,
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
    serve.add_argument(
        "--broker",
        help="mqtt://HOST:PORT, or the nodes of a broker cluster, comma separated (default: the config's,"
        " else localhost:1883)",
    )
    serve.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:8080)")
    serve.add_argument("--db", type=Path, help="SQLite file of fleet history (default console.db)")
    serve.add_argument(
        "--database", help="postgresql://USER:PW@HOST/NAME: several console processes share it"
    )
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
    serve.add_argument(
        "--sign-key", type=Path, help="Ed25519 private key (PEM, `edge-agent keygen`): sign every placement"
    )
    serve.add_argument(
        "--sign-valid-s", type=float, help="how long a published placement stays valid (default 86400)"
    )
    serve.add_argument("--ca-file", type=Path, help="CA of the broker's certificate (mqtts://)")
    serve.add_argument("--cert-file", type=Path, help="the console's client certificate (mutual TLS)")
    serve.add_argument("--key-file", type=Path, help="the key of --cert-file")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="make, list or revoke API tokens (bearer tokens for scripts)")
    token.add_argument("--config", type=Path, help="console TOML file (its users and storage.db)")
    token.add_argument("--db", type=Path, help="the console's SQLite file (default: the config's)")
    token.add_argument("--database", help="the console's PostgreSQL URL (default: the config's)")
    token_sub = token.add_subparsers(dest="action", required=True)
    create = token_sub.add_parser("create", help="make a token; printed once on stdout")
    create.add_argument("--user", required=True, help="the user the token acts for")
    create.add_argument("--name", required=True, help="what the token is for (a label)")
    create.add_argument("--role", choices=["admin", "viewer"], help="default: the user's role")
    listing = token_sub.add_parser("list", help="tokens with their last use (never the secrets)")
    listing.add_argument("--user", help="only this user's tokens")
    revoke = token_sub.add_parser("revoke", help="revoke a token by id (it stops working at once)")
    revoke.add_argument("id")
    token.set_defaults(func=cmd_token)

    simulate = sub.add_parser("simulate", help="run a fleet of fake agents against a broker")
    simulate.add_argument("--broker", required=True, help="mqtt://HOST:PORT")
    simulate.add_argument("--devices", type=int, default=50)
    simulate.add_argument("--interval", type=float, default=2.0, help="telemetry interval, seconds")
    simulate.add_argument("--per-connection", type=int, default=100, help="devices per MQTT connection")
    simulate.add_argument("--id-prefix", default="sim")
    simulate.add_argument("--seed", type=int, default=1)
    simulate.add_argument("--duration", type=float, default=0.0, help="seconds (0: until Ctrl-C)")
    simulate.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND:SHARE:VERSION[:FACTOR]",
        help="a share of devices misbehaves with a model version: load (fails to load), errors, slow"
        " (latency x FACTOR, default 2); repeatable (docs/fleet.md#rollouts)",
    )
    simulate.add_argument("--clear-on-exit", action="store_true", help="clear retained topics at exit")
    simulate.add_argument("--ca-file", type=Path, help="CA of the broker's certificate (mqtts://)")
    simulate.add_argument("--cert-file", type=Path, help="client certificate (mutual TLS)")
    simulate.add_argument("--key-file", type=Path, help="client key (mutual TLS)")
    simulate.add_argument("--tls-insecure", action="store_true", help="skip the broker host name check")
    simulate.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    simulate.set_defaults(func=cmd_simulate)

    hashpw = sub.add_parser("hash-password", help="print a password hash for [[users]] password_hash")
    hashpw.add_argument("--stdin", action="store_true", help="read the password from stdin")
    hashpw.set_defaults(func=cmd_hash_password)

    models_cli.add_parser(sub)
    rollout_cli.add_parser(sub)
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

"""`edge-console models`: the console's model store from a shell, through its REST API (docs/fleet.md).

    edge-console models upload DIR|ARCHIVE [--url URL] [--token TOKEN]
    edge-console models list | delete NAME VERSION | deliver DEVICE NAME [--version V]

The token is an API token (`edge-console token create`, or the Tokens page); `EDGE_CONSOLE_TOKEN`
and `EDGE_CONSOLE_URL` stand in for the flags.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class ApiError(Exception):
    """The console refused the request or could not be reached; the message says why."""


def call(url: str, token: str, method: str, path: str, body: bytes | None = None, kind: str = "") -> Any:
    req = urllib.request.Request(url.rstrip("/") + path, data=body, method=method)  # noqa: S310 - the operator's URL
    req.add_header("Authorization", f"Bearer {token}")
    if kind:
        req.add_header("Content-Type", kind)
    try:
        with urllib.request.urlopen(req, timeout=600) as res:  # noqa: S310
            return json.loads(res.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except ValueError:
            detail = exc.reason
        raise ApiError(f"HTTP {exc.code}: {detail}") from exc
    except OSError as exc:
        raise ApiError(f"cannot reach the console at {url}: {exc}") from exc


def archive_of(source: Path) -> bytes:
    """A model folder as tar.gz (an archive is sent as it is)."""
    if source.is_file():
        return source.read_bytes()
    if not (source / "model.toml").is_file():
        raise ApiError(f"{source}: not a model folder (no model.toml) nor an archive")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(source.iterdir()):
            tar.add(path, arcname=path.name, recursive=False)
    return buf.getvalue()


def cmd_models(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("EDGE_CONSOLE_URL") or "http://127.0.0.1:8080"
    token = args.token or os.environ.get("EDGE_CONSOLE_TOKEN")
    if not token:
        print("edge-console models: give --token or set EDGE_CONSOLE_TOKEN (an API token)", file=sys.stderr)
        return 2
    try:
        if args.action == "upload":
            for source in args.sources:
                entry = call(url, token, "POST", "/api/models", archive_of(Path(source)), "application/gzip")
                print(f"uploaded {entry['name']} {entry['version']} ({entry['size'] / 2**20:.1f} MB)")
        elif args.action == "delete":
            call(url, token, "DELETE", f"/api/models/{args.name}/{args.version}")
            print(f"deleted {args.name} {args.version}")
        elif args.action == "deliver":
            body = json.dumps({"model": args.name, "version": args.version}).encode()
            doc = call(url, token, "POST", f"/api/devices/{args.device}/models", body, "application/json")
            print(f"delivering {doc['model']} {doc['version']} to {args.device}")
        else:
            entries = call(url, token, "GET", "/api/models")
            if args.json:
                print(json.dumps(entries, indent=2))
            for e in [] if args.json else entries:
                devices = ", ".join(e["devices"]) or "-"
                print(f"{e['name']:24s} {e['version']:10s} {e['size'] / 2**20:8.1f} MB  on: {devices}")
    except ApiError as exc:
        print(f"edge-console models: {exc}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub: Any) -> None:
    models = sub.add_parser("models", help="upload, list, delete and deliver model versions (REST API)")
    models.add_argument("--url", help="the console (default $EDGE_CONSOLE_URL, else http://127.0.0.1:8080)")
    models.add_argument("--token", help="an API token (default $EDGE_CONSOLE_TOKEN)")
    actions = models.add_subparsers(dest="action", required=True)
    upload = actions.add_parser("upload", help="upload model folders or tar(.gz) archives")
    upload.add_argument("sources", nargs="+")
    listing = actions.add_parser("list", help="stored versions and the devices that have them")
    listing.add_argument("--json", action="store_true")
    delete = actions.add_parser("delete", help="remove a version from the store")
    delete.add_argument("name")
    delete.add_argument("version")
    deliver = actions.add_parser("deliver", help="deliver a version to a device")
    deliver.add_argument("device")
    deliver.add_argument("name")
    deliver.add_argument("--version", help="default: the newest in the store")
    models.set_defaults(func=cmd_models)

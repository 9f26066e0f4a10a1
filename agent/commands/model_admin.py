"""`edge-agent models`: list, verify and add models in the repository the agent serves from.

An installed wheel carries the bundled models as package data; an operator's own models go into a
folder of their own (`models_dir`). Adding checks a model before it is copied in (manifest, labels,
every present artifact's sha256), and the copy is atomic, so a running agent never sees half a model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent.service.model_repo import ModelError, ModelRepository


def describe(repo: ModelRepository, name: str) -> dict[str, Any]:
    """One model as `edge-agent models` shows it; `verified` is False with the reason on any fault."""
    entry: dict[str, Any] = {"name": name, "verified": False}
    try:
        folder, manifest = repo.manifest(name)
        entry.update(version=manifest.version, task=manifest.task, source=manifest.source)
        entry["versions"] = list(repo.versions(name))  # newest first; the newest is described
        model = repo.load(name, verify=True)
    except ModelError as exc:
        entry["error"] = str(exc)
        return entry
    files = model.artifacts.files
    entry.update(
        verified=True,
        path=str(folder),
        artifacts=sorted(files),
        missing=sorted(model.artifacts.missing),
        size_mb=round(sum(p.stat().st_size for p in _artifact_files(files.values())) / 2**20, 1),
    )
    return entry


def _artifact_files(paths: Any) -> list[Path]:
    """Every file of the artifacts: an OpenVINO IR `.xml` brings its `.bin` (verified with it)."""
    out = []
    for path in paths:
        out.append(path)
        if path.suffix.lower() == ".xml" and path.with_suffix(".bin").is_file():
            out.append(path.with_suffix(".bin"))
    return out


def add(repo: ModelRepository, source: Path, force: bool = False) -> str:
    """Copy the model folder `source` into the repository after verifying it; returns its name."""
    source = source.resolve()
    if not source.is_dir():
        raise ModelError(f"{source}: not a folder (a model is a folder with model.toml)")
    # Verify where it is first: its own folder is a repository of one.
    name = source.name
    candidate = ModelRepository(source.parent)
    entry = describe(candidate, name)
    if not entry["verified"]:
        raise ModelError(f"{source}: {entry.get('error', 'not a valid model')}")
    root = repo.root
    target = root / name
    if target.exists() and not force:
        raise ModelError(f"{target} exists (use --force to replace it)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    except OSError as exc:
        raise ModelError(
            f"cannot write to the model repository {root}: {exc.strerror or exc}. Set models_dir in "
            "agent.toml (or --models) to a folder of your own, e.g. /var/lib/edge-agent/models"
        ) from exc
    old = root / f".{name}.old"
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        os.chmod(staging, 0o755)  # noqa: S103 - mkdtemp makes it private; the service must read it
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            try:
                staging.rename(target)
            except OSError:
                old.rename(target)  # put the model that served back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
    except (OSError, shutil.Error) as exc:
        raise ModelError(f"could not copy {source} into {root}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    after = describe(repo, name)
    if not after["verified"]:
        raise ModelError(f"{target}: copied, but does not verify: {after.get('error')}")
    return name


def run(args: argparse.Namespace, models_dir: Path, versions_dir: Path | None = None) -> int:
    """`versions_dir`: where delivered versions are (docs/fleet.md), listed beside models_dir's."""
    repo = ModelRepository(models_dir, versions_dir)
    if args.action == "add":
        try:
            for source in args.sources:
                name = add(repo, Path(source), force=args.force)
                print(f"added {name} to {repo.root}")
        except ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.action == "path":
        print(repo.root)
        return 0
    entries = [describe(repo, name) for name in repo.names()]
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        print(f"model repository: {repo.root}")
        for e in entries:
            if e["verified"]:
                print(
                    f"  {e['name']:22s} {e['version']:8s} {e['task']:15s} ok  {e['size_mb']:7.1f} MB  "
                    f"{', '.join(e['artifacts'])}"
                )
                if len(e["versions"]) > 1:
                    print(f"  {'':22s} versions: {', '.join(e['versions'])}")
            else:
                print(f"  {e['name']:22s} FAILED  {e.get('error')}")
        if not entries:
            print("  (no models)")
    return 0 if all(e["verified"] for e in entries) else 1


def add_parser(sub: Any) -> argparse.ArgumentParser:
    models: argparse.ArgumentParser = sub.add_parser(
        "models", help="list and verify the model repository, or add a model to it"
    )

    def common(p: argparse.ArgumentParser, default: Any = None) -> None:
        # Given before or after the action; the action's parser must not reset what came before.
        p.add_argument("--config", type=Path, default=default, help="TOML config (for models_dir)")
        p.add_argument(
            "--models", type=Path, default=default, help="model repository folder (default: models_dir)"
        )
        p.add_argument("--json", action="store_true", default=default, help="machine-readable list")

    common(models)
    models.set_defaults(action="list", sources=[], force=False, json=False)
    actions = models.add_subparsers(dest="action")
    listing = actions.add_parser("list", help="list and verify every model (the default)")
    common(listing, argparse.SUPPRESS)
    adding = actions.add_parser("add", help="verify model folders and copy them into the repository")
    common(adding, argparse.SUPPRESS)
    adding.add_argument("sources", nargs="+", help="model folders (each with model.toml)")
    adding.add_argument("--force", action="store_true", help="replace a model of the same name")
    path = actions.add_parser("path", help="print the repository folder")
    common(path, argparse.SUPPRESS)
    return models

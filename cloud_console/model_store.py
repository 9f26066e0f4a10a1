"""The console's model store (docs/fleet.md): uploaded model versions, checked, kept by sha256.

An upload is a tar archive (optionally gzip'd) of one model folder: `model.toml`, its labels and
artifacts, flat. It is checked the way `edge-agent models add` checks a folder (the manifest parses,
the labels are there, every artifact present matches its sha256, at least one is present) before
anything is kept. Files go to `<db folder>/model-store/blobs/<sha256>` (one copy however many
versions share it). Each version's record (a small JSON entry) is a row of the console's database
(`model_versions`), so every console process on one database lists the same versions; the JSON
index files of earlier versions are read into it once. Without a database (tests, tools) the
records stay JSON files in `index/`, written by an atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Engine

from agent.protocol.delivery import ArtifactRef, ModelDelivery, valid_file_name
from agent.protocol.model_manifest import Manifest
from agent.protocol.topics import valid_model_name, valid_version
from cloud_console import db as schema
from cloud_console.db import upsert

log = logging.getLogger(__name__)

MAX_FILES = 64


class ModelRejected(Exception):
    """An upload that is not a valid model (the message says what to fix), or an unknown version."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_folder(folder: Path) -> Manifest:
    """The folder's manifest when it is a valid model, else ModelRejected with the reason."""
    files = {p.name: p for p in folder.iterdir()}
    for name, path in files.items():
        if not valid_file_name(name) or not path.is_file() or path.is_symlink():
            raise ModelRejected(f"{name!r}: a model folder holds plain files with plain names only")
    if "model.toml" not in files:
        raise ModelRejected("no model.toml (a model is a folder with model.toml, labels and artifacts)")
    try:
        manifest = Manifest.model_validate(tomllib.loads(files["model.toml"].read_text()))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ModelRejected(f"model.toml: {exc}") from exc
    if not valid_model_name(manifest.name):
        raise ModelRejected(f"model name {manifest.name!r} is not valid")
    if not valid_version(manifest.version):
        raise ModelRejected(f"version {manifest.version!r} is not valid (no '/', no '..')")
    labels = files.get(manifest.labels)
    if labels is None:
        raise ModelRejected(f"labels file {manifest.labels!r} is missing")
    try:
        count = sum(1 for line in labels.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelRejected(f"labels file {manifest.labels!r}: {exc}") from exc
    if count == 0:
        raise ModelRejected(f"labels file {manifest.labels!r} is empty")
    present = 0
    for fmt, spec in manifest.artifacts.items():
        checks = [(spec.file, spec.sha256)]
        if spec.weights is not None and spec.weights_sha256 is not None:
            checks.append((spec.weights, spec.weights_sha256))
        if spec.file not in files:
            continue
        for file, expected in checks:
            if file not in files:
                raise ModelRejected(f"{fmt}: {file} is missing (beside {spec.file})")
            actual = _sha256(files[file])
            if actual != expected:
                raise ModelRejected(
                    f"{fmt}: {file} sha256 {actual[:12]}... does not match model.toml ({expected[:12]}...)"
                )
        present += 1
    if not present:
        raise ModelRejected("none of the artifacts model.toml lists is in the upload")
    return manifest


MV = schema.model_versions


class ModelStore:
    def __init__(self, root: Path, db: Engine | None = None) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.index = root / "index"
        self.db = db
        if db is not None:
            self._import_index()

    def _import_index(self) -> None:
        """Records kept as JSON files by earlier versions become rows (once; the files are kept)."""
        if not self.index.is_dir():
            return
        rows = []
        for path in sorted(self.index.glob("*/*.json")):
            try:
                entry = json.loads(path.read_text())
                rows.append(_row(entry))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("unreadable model store index %s", path)
        if rows and self.db is not None:
            with self.db.begin() as conn:
                upsert(conn, MV, rows, ["name", "version"], update=[])

    def _put(self, entry: dict[str, Any]) -> None:
        if self.db is not None:
            with self.db.begin() as conn:
                upsert(conn, MV, [_row(entry)], ["name", "version"])
            return
        target = self.index / entry["name"] / f"{entry['version']}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_index = target.with_suffix(".tmp")
        tmp_index.write_text(json.dumps(entry))
        os.replace(tmp_index, target)

    def add_archive(self, archive: Path, user: str) -> dict[str, Any]:
        """Check and keep the model in `archive` (tar or tar.gz); blocking. Returns its entry."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".upload-") as tmp:
            folder = Path(tmp) / "model"
            folder.mkdir()
            _extract(archive, folder)
            manifest = check_folder(folder)
            files: list[dict[str, Any]] = []
            for path in sorted(folder.iterdir()):
                digest = _sha256(path)
                blob = self.blobs / digest
                if not blob.exists():
                    os.replace(path, blob)
                files.append({"name": path.name, "size": blob.stat().st_size, "sha256": digest})
        entry = {
            "name": manifest.name,
            "version": manifest.version,
            "task": manifest.task,
            "files": files,
            "size": sum(f["size"] for f in files),
            "uploaded_at": time.time(),
            "by": user,
        }
        self._put(entry)
        self._collect()  # the files of a version this upload replaced
        log.info("%s uploaded model %s %s", user, manifest.name, manifest.version)
        return entry

    def list(self) -> list[dict[str, Any]]:
        if self.db is not None:
            with self.db.connect() as conn:
                found = conn.scalars(sa.select(MV.c.entry).order_by(MV.c.name, MV.c.version)).all()
            return [json.loads(text) for text in found]
        if not self.index.is_dir():
            return []
        out = []
        for path in sorted(self.index.glob("*/*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                log.warning("unreadable model store index %s", path)
        return out

    def get(self, name: str, version: str) -> dict[str, Any]:
        if not valid_model_name(name) or not valid_version(version):
            raise ModelRejected(f"no model {name!r} version {version!r} in the store")
        if self.db is not None:
            with self.db.connect() as conn:
                text = conn.scalar(sa.select(MV.c.entry).where(MV.c.name == name, MV.c.version == version))
            if text is None:
                raise ModelRejected(f"no model {name!r} version {version!r} in the store")
            found: dict[str, Any] = json.loads(text)
            return found
        path = self.index / name / f"{version}.json"
        try:
            entry: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelRejected(f"no model {name!r} version {version!r} in the store") from exc
        return entry

    def newest(self, name: str) -> str | None:
        versions = [e["version"] for e in self.list() if e["name"] == name]
        return max(versions, key=_version_key) if versions else None

    def delete(self, name: str, version: str) -> None:
        self.get(name, version)
        if self.db is not None:
            with self.db.begin() as conn:
                conn.execute(sa.delete(MV).where(MV.c.name == name, MV.c.version == version))
        (self.index / name / f"{version}.json").unlink(missing_ok=True)  # and its record of old
        self._collect()

    def _collect(self) -> None:
        """Remove stored files no version lists any more."""
        used = {f["sha256"] for entry in self.list() for f in entry["files"]}
        if not self.blobs.is_dir():
            return
        for blob in self.blobs.iterdir():
            if blob.name not in used:
                blob.unlink(missing_ok=True)

    def blob(self, sha256: str) -> Path | None:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            return None
        path = self.blobs / sha256
        return path if path.is_file() else None

    def manifest(self, name: str, version: str, base_url: str) -> ModelDelivery:
        """What a device is told to fetch: each file with its size, sha256 and URL on this console."""
        entry = self.get(name, version)
        base = base_url.rstrip("/")
        return ModelDelivery(
            model=name,
            version=version,
            artifacts=[
                ArtifactRef(
                    name=f["name"], size=f["size"], sha256=f["sha256"], url=f"{base}/api/blobs/{f['sha256']}"
                )
                for f in entry["files"]
            ],
        )


def _row(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": str(entry["name"]),
        "version": str(entry["version"]),
        "entry": json.dumps(entry),
        "uploaded_at": float(entry.get("uploaded_at", 0.0)),
    }


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", version) if p)


def _extract(archive: Path, folder: Path) -> None:
    """Unpack plain files only, flat (one top folder is allowed and dropped): no links, no `..`."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = [m for m in tar.getmembers() if not m.isdir()]
            if len(members) > MAX_FILES:
                raise ModelRejected(f"{len(members)} files: at most {MAX_FILES}")
            for member in members:
                parts = member.name.strip("/").split("/")
                if not member.isfile():
                    raise ModelRejected(f"{member.name!r}: only plain files (no links or devices)")
                if len(parts) > 2 or ".." in parts or member.name.startswith("/"):
                    raise ModelRejected(f"{member.name!r}: files at the top or in one folder, no '..'")
                name = parts[-1]
                if not valid_file_name(name):
                    raise ModelRejected(f"{member.name!r}: not a plain file name")
                source = tar.extractfile(member)
                if source is None:
                    raise ModelRejected(f"{member.name!r}: unreadable")
                target = folder / name
                if target.exists():
                    raise ModelRejected(f"{name!r} appears twice")
                with source, target.open("wb") as out:
                    shutil.copyfileobj(source, out)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ModelRejected(f"not a tar archive (tar or tar.gz of the model folder): {exc}") from exc

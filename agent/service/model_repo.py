"""The model repository: one folder per model with `model.toml`, labels and artifacts.

Versions (docs/fleet.md): `<models_dir>/<name>/` holds one version (its manifest's `version`), and
delivered versions live in `<versions_dir>/<name>/<version>/`, each a complete model folder, put
there whole by an atomic rename. Without a pinned version the newest installed one serves.

Every path is resolved inside the repository (no `..`, no absolute paths, no symlinks that lead
out), and every artifact's sha256 is checked against the manifest before a backend sees it (an
OpenVINO IR's `.bin` weights too: `weights_sha256`).

A device may hold only the artifacts its accelerators use (a Coral box needs no `model.pt2`): an
artifact listed in the manifest but absent is simply not offered, and a backend that needs it
reports which one is missing. An artifact that is present but does not match is always refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from agent.protocol.delivery import InstalledModel, InstalledVersion
from agent.protocol.model_manifest import ArtifactSpec, DetectionSpec, InputSpec, Manifest
from agent.protocol.topics import MODEL_NAME_RE, VERSION_RE, valid_model_name, valid_version
from agent.service.errors import AgentError
from backends.base import ModelArtifacts

# The manifest's models live in the protocol package (the console checks uploads with them).
__all__ = ["ArtifactSpec", "DetectionSpec", "InputSpec", "Manifest", "Model", "ModelError", "ModelRepository"]

log = logging.getLogger(__name__)


class ModelError(AgentError):
    """A model that cannot be served: unknown, malformed manifest, unsafe path or bad checksum."""


class _Missing(ModelError):
    """A file the manifest names is not there (fatal for labels, not for one artifact)."""


@dataclass(frozen=True)
class Model:
    """A verified model, ready to hand to a backend."""

    manifest: Manifest
    root: Path
    labels: tuple[str, ...]
    artifacts: ModelArtifacts

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def input(self) -> InputSpec:
        return self.manifest.input


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Order versions naturally: "1.0.10" after "1.0.9", "2" after "1.9" (newest is the largest)."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", version) if part
    )


class ModelRepository:
    def __init__(self, root: Path, versions_root: Path | None = None) -> None:
        self.root = root.resolve()
        # Where delivered versions are installed (`[models] dir`); None: only `root`.
        self.versions_root = versions_root.resolve() if versions_root is not None else None
        self._lock = threading.Lock()
        # (path, size, mtime_ns) -> sha256, so a model is hashed once per change, not per load.
        self._hashes: dict[tuple[str, int, int], str] = {}

    def names(self) -> list[str]:
        names = set(self._base_names())
        for name, _ in self._delivered():
            names.add(name)
        return sorted(names)

    def _base_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [
            p.name
            for p in self.root.iterdir()
            if valid_model_name(p.name) and ((p / "model.toml").is_file() or (p / "model.json").is_file())
        ]

    def _delivered(self, only: str | None = None) -> list[tuple[str, str]]:
        """(name, version) of every delivered version folder with a manifest."""
        if self.versions_root is None or not self.versions_root.is_dir():
            return []
        out = []
        for model in self.versions_root.iterdir():
            if not valid_model_name(model.name) or (only is not None and model.name != only):
                continue
            if model.is_dir():
                out += [
                    (model.name, v.name)
                    for v in model.iterdir()
                    if valid_version(v.name) and (v / "model.toml").is_file()
                ]
        return out

    def versions(self, name: str) -> dict[str, Path]:
        """Every installed version of `name` and its folder, newest first (a delivered version wins
        over the same version in `models_dir`)."""
        found: dict[str, Path] = {}
        if name in self._base_names():
            try:
                found[self._read_manifest(self.root / name, name).version] = self.root / name
            except ModelError:
                found.setdefault("0", self.root / name)  # reported when it is loaded
        if self.versions_root is not None:
            for _, version in self._delivered(only=name):
                found[version] = self.versions_root / name / version
        return dict(sorted(found.items(), key=lambda item: version_key(item[0]), reverse=True))

    def installed(self) -> list[InstalledModel]:
        """Every model with its versions and each file's sha256 as listed by its manifest (status)."""
        out = []
        for name in self.names():
            versions = []
            for version in self.versions(name):
                try:
                    _, manifest = self.manifest(name, version)
                except ModelError:
                    continue
                digests = {spec.file: spec.sha256 for spec in manifest.artifacts.values()}
                versions.append(InstalledVersion(version=version, sha256=digests))
            out.append(InstalledModel(name=name, versions=versions))
        return out

    def _inside(self, path: Path, what: str) -> Path:
        resolved = path.resolve()
        roots = [self.root] + ([self.versions_root] if self.versions_root is not None else [])
        if not any(resolved.is_relative_to(root) for root in roots):
            raise ModelError(f"{what} {path} leads outside the model repository")
        return resolved

    def _model_file(self, folder: Path, relative: str, what: str) -> Path:
        rel = Path(relative)
        if rel.is_absolute() or ".." in rel.parts:
            raise ModelError(f"{what} path {relative!r} must be relative and inside the model folder")
        path = self._inside(folder / rel, what)
        if not path.is_relative_to(folder):
            raise ModelError(f"{what} path {relative!r} leads outside its model folder")
        if not path.is_file():
            raise _Missing(f"{what} {relative!r} is missing")
        return path

    def manifest(self, name: str, version: str | None = None) -> tuple[Path, Manifest]:
        """Parse a model's manifest (`version`, or the newest installed) without touching artifacts
        (cheap; for validation)."""
        if not valid_model_name(name):
            raise ModelError(f"model name {name!r} is not valid (must match {MODEL_NAME_RE.pattern})")
        if version is not None and not valid_version(version):
            raise ModelError(f"model version {version!r} is not valid (must match {VERSION_RE.pattern})")
        versions = self.versions(name)
        if not versions:
            raise ModelError(f"unknown model {name!r} (available: {', '.join(self.names()) or 'none'})")
        if version is None:
            version = next(iter(versions))
        elif version not in versions:
            raise ModelError(
                f"model {name!r} has no version {version!r} on this device (installed: {', '.join(versions)})"
            )
        folder = self._inside(versions[version], "model folder")
        manifest = self._read_manifest(folder, name)
        delivered = folder.parent.name == name and folder.parent.parent == self.versions_root
        if delivered and manifest.version != version:
            raise ModelError(f"model {name!r}: folder {version!r} holds version {manifest.version!r}")
        return folder, manifest

    def _read_manifest(self, folder: Path, name: str) -> Manifest:
        toml_path, json_path = folder / "model.toml", folder / "model.json"
        try:
            if toml_path.is_file():
                raw = tomllib.loads(self._inside(toml_path, "manifest").read_text())
            elif json_path.is_file():
                raw = json.loads(self._inside(json_path, "manifest").read_text())
            else:
                raise ModelError(f"unknown model {name!r} (available: {', '.join(self.names()) or 'none'})")
            manifest = Manifest.model_validate(raw)
        except (
            OSError,
            UnicodeDecodeError,
            tomllib.TOMLDecodeError,
            json.JSONDecodeError,
            ValidationError,
        ) as exc:
            raise ModelError(f"model {name!r}: bad manifest: {exc}") from exc
        if manifest.name != name:
            raise ModelError(f"model folder {name!r} holds a manifest named {manifest.name!r}")
        return manifest

    def load(self, name: str, verify: bool = True, version: str | None = None) -> Model:
        """The verified model `name` (`version`, or the newest installed). Blocking file I/O: call it
        from a worker thread."""
        folder, manifest = self.manifest(name, version)
        try:
            labels_path = self._model_file(folder, manifest.labels, "labels file")
            text = labels_path.read_text(encoding="utf-8")
        except ModelError as exc:
            raise ModelError(f"model {name!r}: {exc}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(
                f"model {name!r}: labels file {manifest.labels!r} unreadable (UTF-8 expected): {exc}"
            ) from exc
        labels = tuple(line.strip() for line in text.splitlines() if line.strip())
        files: dict[str, Path] = {}
        missing: dict[str, str] = {}
        for fmt, spec in manifest.artifacts.items():
            try:
                path = self._model_file(folder, spec.file, f"{fmt} artifact")
            except _Missing:
                missing[fmt] = spec.file  # not installed on this device
                continue
            checks = [(path, spec.file, spec.sha256)]
            if spec.weights is not None and spec.weights_sha256 is not None:
                try:
                    weights = self._model_file(folder, spec.weights, f"{fmt} weights")
                except _Missing as exc:  # an IR without its weights is broken, not absent
                    raise ModelError(f"model {name!r}: {exc} (beside {spec.file})") from exc
                checks.append((weights, spec.weights, spec.weights_sha256))
            if verify:
                for file, listed, expected in checks:
                    actual = self._sha256(file)
                    if actual != expected:
                        raise ModelError(
                            f"model {name!r}: {listed} sha256 {actual[:12]}... does not match the "
                            f"manifest ({expected[:12]}...); refusing to load it"
                        )
            files[fmt] = path
        if not files:
            listed = ", ".join(spec.file for spec in manifest.artifacts.values())
            raise ModelError(f"model {name!r}: none of its artifacts is present ({listed})")
        artifacts = ModelArtifacts(
            name=name,
            files=files,
            input_size=manifest.input.size,
            layout=manifest.input.layout,
            dtype=manifest.input.dtype,
            num_classes=len(labels),
            sha256={fmt: spec.sha256 for fmt, spec in manifest.artifacts.items()},
            layouts={fmt: spec.layout or manifest.input.layout for fmt, spec in manifest.artifacts.items()},
            missing=missing,
        )
        return Model(manifest=manifest, root=folder, labels=labels, artifacts=artifacts)

    def _sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._hashes.get(key)
        if cached is None:
            cached = sha256_file(path)
            with self._lock:
                self._hashes[key] = cached
        return cached


def install_staged(staged: Path, root: Path, name: str, version: str) -> Path:
    """Verify the model folder `staged/<name>` and rename it to `root/<name>/<version>`: a version
    appears whole or not at all, never half-written to a placement. ModelError or OSError."""
    model = ModelRepository(staged).load(name, verify=True)
    if model.manifest.version != version:
        raise ModelError(f"model.toml says version {model.manifest.version!r}, not {version!r}")
    target = root / name / version
    target.parent.mkdir(parents=True, exist_ok=True)
    (staged / name).chmod(0o755)
    (staged / name).rename(target)  # atomic within one filesystem
    return target

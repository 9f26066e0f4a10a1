"""Model delivery on the device: fetch a version the console announces, check it, install it whole.

The console publishes a manifest on `edge/<id>/models` (agent/protocol/delivery.py). The agent
refuses it before any byte is fetched when it is unsigned or wrongly signed where placements must be
signed, names a file with `/` or `..`, points at a host other than `[models] console_url`, or would
not fit on the disk. Files are fetched with urllib3 (timeouts, the console's CA, a client
certificate or bearer token) into `.incoming/`, resumed with an HTTP Range request after a broken
connection, cut off past their announced size and checked against their sha256. The complete folder
is verified as a model (`ModelRepository.load`) and only then renamed into place: a placement never
sees half a version. docs/fleet.md describes the whole path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from agent.protocol.delivery import ArtifactRef, DeliveryProgress, ModelDelivery
from agent.protocol.signing import PublicKeys, SignatureRefused, verify
from agent.service.config import ModelsConfig
from agent.service.errors import AgentError
from agent.service.model_repo import ModelError, ModelRepository, install_staged, version_key

log = logging.getLogger(__name__)

ATTEMPTS = 5  # per file: a broken connection is resumed this many times before the delivery fails
PROGRESS_EVERY_S = 0.5  # status is updated at most this often while bytes arrive


class DeliveryError(AgentError):
    """A delivery refused or failed; the message says why (status and edge/<id>/events)."""


def check_manifest(
    payload: bytes,
    settings: ModelsConfig,
    public_key: PublicKeys | None,
    max_age_s: float,
    now: float | None = None,
) -> ModelDelivery:
    """The manifest in `payload`, or DeliveryError with the reason: pure, no I/O."""
    try:
        doc = json.loads(payload)
    except ValueError as exc:
        raise DeliveryError(f"invalid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise DeliveryError("not a JSON object")
    if public_key is not None:
        try:
            verify(doc, public_key, max_age_s, now=now)
        except SignatureRefused as exc:
            raise DeliveryError(f"signature: {exc}") from exc
    try:
        delivery = ModelDelivery.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'manifest'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise DeliveryError(problems) from exc
    allowed = allowed_hosts(settings)
    if not allowed:
        raise DeliveryError("no [models] console_url configured: this device takes no deliveries")
    limit = int(settings.max_artifact_mb * 2**20)
    for artifact in delivery.artifacts:
        parts = urlsplit(artifact.url)
        if parts.scheme not in ("http", "https") or _host(parts.scheme, parts.netloc) not in allowed:
            raise DeliveryError(
                f"{artifact.name}: {artifact.url} is not on the configured console "
                f"({', '.join(sorted(allowed))}); refused"
            )
        if artifact.size > limit:
            raise DeliveryError(
                f"{artifact.name}: {artifact.size} bytes is over [models] max_artifact_mb "
                f"({settings.max_artifact_mb:g} MB)"
            )
    return delivery


def allowed_hosts(settings: ModelsConfig) -> set[str]:
    """The console's and each `allow_hosts` entry's `scheme://host:port` (https unless given)."""
    out = set()
    if settings.console_url:
        parts = urlsplit(settings.console_url)
        out.add(_host(parts.scheme, parts.netloc))
    for entry in settings.allow_hosts:
        parts = urlsplit(entry if "://" in entry else f"https://{entry}")
        out.add(_host(parts.scheme, parts.netloc))
    return out


def _host(scheme: str, netloc: str) -> str:
    """`scheme://host:port`: the scheme counts (an https console is not fetched from over http)."""
    host = netloc.rsplit("@", 1)[-1].lower()
    if ":" not in host.rsplit("]", 1)[-1]:
        host = f"{host}:{443 if scheme == 'https' else 80}"
    return f"{scheme}://{host}"


class Fetcher:
    """Downloads with resume; blocking (runs in a worker thread)."""

    def __init__(self, settings: ModelsConfig) -> None:
        import urllib3  # only a device that takes deliveries loads it

        self.settings = settings
        kwargs: dict[str, Any] = {"retries": False, "timeout": urllib3.Timeout(total=None)}
        timeout = settings.timeout_s
        kwargs["timeout"] = urllib3.Timeout(connect=timeout, read=timeout)
        if settings.ca_file is not None:
            kwargs["ca_certs"] = str(settings.ca_file)
        if settings.cert_file is not None:
            kwargs["cert_file"] = str(settings.cert_file)
            kwargs["key_file"] = str(settings.key_file) if settings.key_file else None
        self.http = urllib3.PoolManager(**kwargs)
        self.headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}

    def fetch(self, artifact: ArtifactRef, part: Path, progress: Callable[[int], None]) -> None:
        """Fetch `artifact` into `part`, resuming what is there; check size and sha256."""
        import urllib3

        for attempt in range(1, ATTEMPTS + 1):
            have = part.stat().st_size if part.exists() else 0
            if have > artifact.size:
                part.unlink()
                have = 0
            if have == artifact.size:
                break
            try:
                self._get(artifact, part, have, progress)
                break
            except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
                # A certificate that does not verify will not verify on the next try either.
                if attempt == ATTEMPTS or isinstance(exc, urllib3.exceptions.SSLError):
                    raise DeliveryError(f"{artifact.name}: download failed: {exc}") from exc
                log.warning("%s: %s; resuming (attempt %d of %d)", artifact.name, exc, attempt + 1, ATTEMPTS)
                time.sleep(min(0.25 * 2**attempt, 5.0))
        digest = _sha256(part)
        if digest != artifact.sha256:
            part.unlink()
            raise DeliveryError(
                f"{artifact.name}: sha256 {digest[:12]}... does not match the manifest "
                f"({artifact.sha256[:12]}...): tampered or corrupted, refused"
            )

    def _get(self, artifact: ArtifactRef, part: Path, have: int, progress: Callable[[int], None]) -> None:
        headers = dict(self.headers)
        if have:
            headers["Range"] = f"bytes={have}-"
        response = self.http.request("GET", artifact.url, headers=headers, preload_content=False)
        try:
            if response.status == 200:
                have = 0  # the server ignored the Range: start again
            elif response.status != 206 or not have:
                raise DeliveryError(f"{artifact.name}: HTTP {response.status} from {artifact.url}")
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and have + int(length) > artifact.size:
                raise DeliveryError(
                    f"{artifact.name}: the server sends {have + int(length)} bytes, more than the "
                    f"{artifact.size} announced; refused"
                )
            with part.open("ab" if have else "wb") as out:
                for chunk in response.stream(1 << 16):
                    have += len(chunk)
                    if have > artifact.size:
                        raise DeliveryError(
                            f"{artifact.name}: larger than the {artifact.size} bytes announced; refused"
                        )
                    out.write(chunk)
                    progress(len(chunk))
        except DeliveryError:
            part.unlink(missing_ok=True)
            raise
        finally:
            response.release_conn()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Deliverer:
    """Takes manifests from MQTT, runs one delivery per (model, version) at a time, reports."""

    def __init__(
        self,
        settings: ModelsConfig,
        repo: ModelRepository,
        public_key: PublicKeys | None,
        max_age_s: float,
        report: Callable[[DeliveryProgress, bool], None],
        placed: Callable[[], set[tuple[str, str]]],
    ) -> None:
        self.settings = settings
        self.repo = repo
        self.public_key = public_key
        self.max_age_s = max_age_s
        # report(progress, announce): status always, edge/<id>/events when `announce`.
        self.report = report
        self.placed = placed  # (model, version) serving now: never removed
        self._running: dict[tuple[str, str], asyncio.Task[DeliveryProgress]] = {}
        self._fetcher: Fetcher | None = None

    @property
    def root(self) -> Path:
        if self.repo.versions_root is None:
            raise DeliveryError("no folder for delivered versions")
        return self.repo.versions_root

    def submit(self, payload: bytes) -> None:
        """MQTT handler: check the manifest now, fetch in the background."""
        try:
            delivery = check_manifest(payload, self.settings, self.public_key, self.max_age_s)
        except DeliveryError as exc:
            log.warning("model delivery refused: %s", exc)
            model, version = _names_of(payload)
            self.report(DeliveryProgress(model=model, version=version, state="failed", error=str(exc)), True)
            return
        key = (delivery.model, delivery.version)
        if key in self._running:
            log.info("delivery of %s %s already running; this one is ignored", *key)
            return
        if delivery.version in self.repo.versions(delivery.model):
            log.debug("%s %s is installed; nothing to deliver", *key)
            return
        task = asyncio.get_running_loop().create_task(self.deliver(delivery), name=f"delivery {key}")
        self._running[key] = task
        task.add_done_callback(lambda _: self._running.pop(key, None))

    async def deliver(self, delivery: ModelDelivery) -> DeliveryProgress:
        """Fetch, verify, install, prune; the outcome is reported and returned."""
        loop = asyncio.get_running_loop()
        state = DeliveryProgress(
            model=delivery.model,
            version=delivery.version,
            state="downloading",
            bytes_total=delivery.total_bytes,
        )
        self.report(state.model_copy(), True)
        last = [0.0]

        def progress(n: int) -> None:  # worker thread
            state.bytes_done += n
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S:
                last[0] = now
                loop.call_soon_threadsafe(self.report, state.model_copy(update={"ts": time.time()}), False)

        try:
            await asyncio.to_thread(self._fetch_and_install, delivery, progress)
        except (DeliveryError, ModelError) as exc:
            log.warning("delivery of %s %s failed: %s", delivery.model, delivery.version, exc)
            done = state.model_copy(update={"state": "failed", "error": str(exc), "ts": time.time()})
        else:
            log.info("installed %s %s", delivery.model, delivery.version)
            done = state.model_copy(update={"state": "installed", "ts": time.time()})
        self.report(done, True)
        return done

    def _fetch_and_install(self, delivery: ModelDelivery, progress: Callable[[int], None]) -> None:
        name, version = delivery.model, delivery.version
        incoming = self.root / ".incoming" / f"{name}@{version}"
        folder = incoming / name  # a repository of one, verified where it is before the rename
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._check_space(delivery, folder)
            if self._fetcher is None:
                self._fetcher = Fetcher(self.settings)
            for artifact in delivery.artifacts:
                part = folder / f"{artifact.name}.part"
                self._fetcher.fetch(artifact, part, progress)
                part.rename(folder / artifact.name)
        except OSError as exc:
            shutil.rmtree(incoming, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise DeliveryError(
                    "the disk filled up during the download; removed what was fetched"
                ) from exc
            raise DeliveryError(f"could not write {folder}: {exc}") from exc
        except DeliveryError:
            if not any(p.suffix == ".part" for p in folder.iterdir()):
                shutil.rmtree(incoming, ignore_errors=True)  # keep only what a retry can resume
            raise
        try:
            install_staged(incoming, self.root, name, version)  # whole or not at all
        except ModelError as exc:
            raise DeliveryError(f"the files arrived but do not make a valid model: {exc}") from exc
        except OSError as exc:
            raise DeliveryError(f"could not install into {self.root / name}: {exc}") from exc
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        self.prune(name)

    def _check_space(self, delivery: ModelDelivery, folder: Path) -> None:
        have = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        need = delivery.total_bytes - have + int(self.settings.min_free_mb * 2**20)
        free = shutil.disk_usage(folder).free
        if free < need:
            raise DeliveryError(
                f"not enough disk: {free / 2**20:.0f} MB free, {need / 2**20:.0f} MB needed "
                f"({delivery.total_bytes / 2**20:.1f} MB of files and [models] min_free_mb)"
            )

    def prune(self, name: str) -> list[str]:
        """Remove delivered versions beyond the placed ones, the newest and `keep_versions` more."""
        delivered = sorted(
            (p.name for p in (self.root / name).iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=version_key,
            reverse=True,
        )
        newest = next(iter(self.repo.versions(name)), None)
        placed = {v for m, v in self.placed() if m == name}
        older = [v for v in delivered if v != newest and v not in placed]
        removed = []
        for version in older[self.settings.keep_versions :]:
            trash = self.root / name / f".{version}.removing"
            with contextlib.suppress(OSError):
                (self.root / name / version).rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(version)
        if removed:
            log.info(
                "removed %s %s (models.keep_versions = %d)",
                name,
                ", ".join(removed),
                self.settings.keep_versions,
            )
        return removed

    async def stop(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        for task in list(self._running.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _names_of(payload: bytes) -> tuple[str, str]:
    """Best-effort model and version of a refused manifest, for the report."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return "?", "?"
    if not isinstance(doc, dict):
        return "?", "?"
    return str(doc.get("model", "?"))[:64], str(doc.get("version", "?"))[:64]

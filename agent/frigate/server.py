"""The ROUTER socket Frigate's `zmq` detectors connect to: each request becomes a frame of a tenant.

Several Frigate detector processes (each a REQ socket) are served at once: their frames meet in the
tenant's queue, so they are batched together, and candidates and failover apply as to MQTT frames.
A tensor needs no decode; the tenant resizes it only where its size differs from the model's.

Which model a request is for is not in it: the handshake names it, and is remembered per socket
identity. Frigate rebuilds its socket (a new identity) and repeats the handshake after a timeout. A
socket the agent has not seen a handshake from (the agent restarted under it) is served only when
one model serves every name; otherwise it gets no answer, so that Frigate's timeout rebuilds the
socket and repeats the handshake.

Sockets are used on the event loop only: answers made on worker threads are handed over with
call_soon_threadsafe (a ZeroMQ socket is not thread-safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from agent.frames.ingest import Frame
from agent.frames.tenant_table import TenantTable
from agent.frigate import labelmap, transfer, wire
from agent.protocol.schemas import DetectionResult, ErrorResult
from agent.service.config import ConfigError, FrigateConfig
from agent.service.model_repo import ModelRepository

log = logging.getLogger(__name__)

MAX_CLIENTS = 4096  # socket identities remembered (each rebuilt Frigate socket is a new one)
LOG_EVERY_S = 10.0  # a repeated problem is logged once per this long, with how often it happened


class FrigateServer:
    def __init__(
        self,
        config: FrigateConfig,
        table: TenantTable,
        accepting: Callable[[], bool],
        save_dir: Path,
        repo: ModelRepository | None = None,
        place: Callable[[str, str], Awaitable[str | None]] | None = None,
    ) -> None:
        self.config = config
        self.table = table
        self.accepting = accepting
        self.save_dir = save_dir
        # A model Frigate sends is installed in `repo` and placed through `place(model, version)`,
        # which answers why not (None: placed); without them it is only saved.
        self.repo = repo
        self.place = place
        try:
            self.labelmap = labelmap.load(config.labelmap)
        except labelmap.LabelmapError as exc:
            raise ConfigError(f"frigate.labelmap: {exc}") from exc
        served = {*config.models.values(), *([config.default_model] if config.default_model else [])}
        self._sole_model = next(iter(served)) if len(served) == 1 else None
        self._clients: OrderedDict[bytes, str] = OrderedDict()  # socket identity -> model
        self._ids: dict[tuple[str, ...], np.ndarray] = {}  # a model's labels -> their Frigate ids
        self._numbers = itertools.count()
        self._logged: dict[str, tuple[float, int]] = {}  # problem -> (last logged, times since)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self) -> None:
        """Bind every endpoint (at start: a bad one is a configuration error, exit code 2)."""
        self._context = zmq.asyncio.Context()
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # A larger message (a model file included) disconnects its sender before it is read.
        sock.setsockopt(zmq.MAXMSGSIZE, int(self.config.max_model_mb * 1024 * 1024) + 65536)
        self._socket = sock
        for endpoint in self.config.endpoints:
            try:
                if endpoint.startswith("ipc://"):
                    Path(endpoint[len("ipc://") :]).parent.mkdir(parents=True, exist_ok=True)
                sock.bind(endpoint)
            except (OSError, zmq.ZMQError) as exc:
                self.close()
                raise ConfigError(f"frigate.endpoints: cannot bind {endpoint}: {exc}") from exc
        log.info("serving Frigate's zmq detector on %s", ", ".join(self.config.endpoints))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._context is not None:
            self._context.term()
            self._context = None

    async def run(self) -> None:
        """Take requests until cancelled (the daemon cancels it after the tenants drained)."""
        if self._socket is None:
            self.bind()
        sock = self._socket
        assert sock is not None  # bound above
        self._loop = asyncio.get_running_loop()
        try:
            while True:
                parts = await sock.recv_multipart()
                try:
                    self._handle(parts)
                except Exception:  # a bug must not stop serving the other clients
                    log.exception("Frigate request failed")
        finally:
            for task in self._tasks:
                task.cancel()
            self.close()

    # -- requests -------------------------------------------------------------------------------
    def _handle(self, parts: list[bytes]) -> None:
        # A REQ peer's envelope is [identity, b""]; a DEALER may send no empty delimiter.
        cut = parts.index(b"") + 1 if b"" in parts[:2] else 1
        envelope, frames = parts[:cut], parts[cut:]
        try:
            request = wire.parse(frames)
        except wire.BadRequest as exc:
            self._note(f"bad request: {exc}")
            self._send(envelope, wire.ZERO_ROWS)
            return
        if isinstance(request, wire.Tensor):
            self._infer(envelope, request)
        elif isinstance(request, wire.Handshake):
            self._spawn(self._handshake(envelope, request.model_name))
        else:
            self._spawn(self._model_data(envelope, request))

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _model_for(self, model_name: str) -> str | None:
        """The repository model serving Frigate's name: mapped, else one Frigate sent, else the default."""
        mapped = self.config.models.get(model_name)
        if mapped is not None:
            return mapped
        if self.repo is not None:
            with contextlib.suppress(transfer.TransferRefused):
                sent = transfer.repo_name(model_name)
                if self.table.get(sent) is not None or self.repo.versions(sent):
                    return sent
        return self.config.default_model

    async def _handshake(self, envelope: list[bytes], model_name: str) -> None:
        model = self._model_for(model_name)
        if model is None:
            log.info(
                "Frigate asks for model %r: not in [frigate.models], no default_model: it will send the file",
                model_name,
            )
            self._send(envelope, wire.reply({"model_available": False, "model_loaded": False}))
            return
        # Frigate waits 30 s for this answer; a tenant still loading gets most of that.
        deadline = time.monotonic() + self.config.handshake_wait_s
        while self.table.get(model) is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # the tenant table has no event to wait on
        loaded = self.table.get(model) is not None
        if loaded:
            self._clients[envelope[0]] = model
            self._clients.move_to_end(envelope[0])
            while len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
            log.info("Frigate client for model %r served by %s", model_name, model)
        else:
            why = self.table.unavailable_reason(model) or "no tenant serves it (place it on this device)"
            log.warning("Frigate asks for model %r (%s): %s", model_name, model, why)
        self._send(envelope, wire.reply({"model_available": True, "model_loaded": loaded}))

    async def _model_data(self, envelope: list[bytes], request: wire.ModelData) -> None:
        path = self.save_dir / request.model_name
        try:
            await asyncio.to_thread(_save, path, request.data)
        except OSError as exc:
            log.error("Frigate sent model %r: cannot save it to %s: %s", request.model_name, path, exc)
            self._send(envelope, wire.reply({"model_saved": False, "model_loaded": False}))
            return
        why = await self._serve_sent(envelope, request)
        if why is not None:
            log.warning(
                "Frigate sent model %r (%d bytes), saved to %s; not served: %s "
                "(docs/frigate.md#models-frigate-sends)",
                request.model_name,
                len(request.data),
                path,
                why,
            )
        self._send(envelope, wire.reply({"model_saved": True, "model_loaded": why is None}))

    async def _serve_sent(self, envelope: list[bytes], request: wire.ModelData) -> str | None:
        """Install and place a model Frigate sent; why not (None: its tenant serves)."""
        if self.repo is None or self.place is None or not self.config.accept_models:
            return "[frigate] accept_models is off"
        try:
            model, version = await asyncio.to_thread(
                transfer.install, self.repo, request.model_name, request.data, self.labelmap
            )
        except transfer.TransferRefused as exc:
            return str(exc)
        log.info("Frigate sent model %r: installed as %s %s", request.model_name, model, version)
        why = await self.place(model, version)
        if why is not None:
            return why
        tenant = self.table.get(model)
        if tenant is None:
            return self.table.unavailable_reason(model) or "its tenant did not start"
        self._clients[envelope[0]] = model
        return None

    def _infer(self, envelope: list[bytes], tensor: wire.Tensor) -> None:
        model = self._clients.get(envelope[0]) or self._sole_model
        if model is None:
            # No answer: Frigate's timeout rebuilds its socket and repeats the handshake.
            self._note("a request from a socket that made no handshake (the agent restarted?): not answered")
            return
        tenant = self.table.get(model) if self.accepting() else None
        if tenant is None:
            self._note(f"model {model}: not served now; zero rows answered")
            self._send(envelope, wire.ZERO_ROWS)
            return
        labels = tuple(tenant.model.labels)  # the key: a new version of the model may differ
        ids = self._ids.get(labels)
        if ids is None:
            ids, missing = labelmap.class_ids(labels, self.labelmap)
            if missing:
                log.warning(
                    "model %s: classes not in the Frigate labelmap, never answered: %s", model, missing
                )
            self._ids[labels] = ids
        loop = self._loop
        assert loop is not None  # run() set it

        def answer(outcome: Any) -> None:  # a worker thread: build the bytes here, send on the loop
            problem = None
            if isinstance(outcome, DetectionResult):
                payload = wire.rows(outcome.detections, ids)
            else:
                if isinstance(outcome, ErrorResult):
                    problem = f"model {model}: {outcome.error.code}: {outcome.error.message}"
                else:
                    problem = f"model {model} is not a detector: zero rows answered"
                payload = wire.ZERO_ROWS
            # RuntimeError: the loop has closed (the agent stopped), nobody is left to answer.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._answered, envelope, payload, problem)

        now = time.monotonic()
        frame = Frame(
            request_id=f"frigate-{next(self._numbers)}",
            model=model,
            image=b"",
            received=now,
            # Frigate stops waiting after its timeout: a frame still queued then is not run.
            expires_at=now + self.config.request_timeout_ms / 1000.0,
            pixels=tensor.pixels,
            on_answer=answer,
        )
        tenant.submit(frame)

    def _answered(self, envelope: list[bytes], payload: bytes, problem: str | None) -> None:
        if problem is not None:
            self._note(problem)
        self._send(envelope, payload)

    def _send(self, envelope: list[bytes], payload: bytes) -> None:
        """Answer on the loop (an identity whose socket is gone is dropped by the ROUTER socket)."""
        if self._socket is None:
            return
        sent = self._socket.send_multipart([*envelope, payload])
        if isinstance(sent, asyncio.Future):
            sent.add_done_callback(_consume)

    def _note(self, problem: str) -> None:
        """Log a problem at most once per LOG_EVERY_S, with how often it happened meanwhile."""
        now = time.monotonic()
        last, times = self._logged.get(problem, (0.0, 0))
        if now - last >= LOG_EVERY_S:
            log.warning("Frigate: %s%s", problem, f" ({times + 1} times)" if times else "")
            self._logged[problem] = (now, 0)
        else:
            self._logged[problem] = (last, times + 1)
        if len(self._logged) > 256:
            self._logged.clear()


def _save(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("Frigate: answer not sent: %s", future.exception())

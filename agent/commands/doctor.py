"""`edge-agent doctor`: check what a device needs to serve, and say what to fix."""

from __future__ import annotations

import asyncio
import glob
import grp
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.protocol.schemas import Placement
from agent.protocol.topics import valid_model_name
from agent.service.config import AgentConfig
from agent.service.model_repo import ModelError, ModelRepository

Level = Literal["ok", "warn", "fail"]
MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


@dataclass
class Check:
    level: Level
    what: str
    detail: str = ""
    fix: str = ""


def check_state_dir(path: Path) -> Check:
    if path.exists() and not path.is_dir():
        return Check("fail", f"state dir {path}", "is a file, not a folder", "point state_dir at a folder")
    probe = path if path.exists() else path.parent
    if not probe.exists():
        return Check("fail", f"state dir {path}", "neither it nor its parent exists", f"mkdir -p {path}")
    if not os.access(probe, os.W_OK | os.X_OK):
        return Check(
            "fail",
            f"state dir {path}",
            "not writable by this user",
            f"chown -R edge-agent:edge-agent {path} (or run as the service user)",
        )
    return Check("ok", f"state dir {path}", "writable")


def serving_placement(config: AgentConfig) -> tuple[Placement, str]:
    """What the agent serves at its next start, and where that comes from: the placement the agent
    saved when it last applied one (agent/placement/store.py) if there is one, else the config's."""
    saved = config.state_dir / "placement.json"
    try:
        return Placement.model_validate_json(saved.read_text()), f"saved placement {saved}"
    except (OSError, ValueError):
        return config.placement, "placement in the config"


def placed_models(config: AgentConfig) -> set[str]:
    return {t.model for t in serving_placement(config)[0].tenants}


def check_models(config: AgentConfig) -> list[Check]:
    """Placed models must load (fail); the default model and the rest of the repository are checked
    too (warn): a model added for later should not wait for its placement to show its problem."""
    repo = ModelRepository(config.models_dir)
    placed = placed_models(config)
    others = set(repo.names()) | {config.ingest.default_model}
    out = []
    for name in sorted(placed) + sorted(others - placed):
        try:
            model = repo.load(name)  # parses the manifest and verifies every artifact's sha256
            detail = f"{', '.join(model.artifacts.files)} sha256 verified"
            if model.artifacts.missing:
                detail += f"; not installed here: {', '.join(model.artifacts.missing.values())}"
            out.append(Check("ok", f"model {name}", detail + ("" if name in placed else " (not placed)")))
        except ModelError as exc:
            level: Literal["fail", "warn"] = "fail" if name in placed else "warn"
            out.append(Check(level, f"model {name}", str(exc), f"check {config.models_dir / name}"))
    if config.models_dir.is_dir():
        for folder in sorted(p for p in config.models_dir.iterdir() if p.is_dir()):
            # Hidden and Python's own folders (`__pycache__` of the wheel's bundled models package,
            # `.name.old` left by `models add`) are not meant as models.
            if not valid_model_name(folder.name) and not folder.name.startswith((".", "_")):
                out.append(
                    Check(
                        "warn",
                        f"folder {folder.name}",
                        "not a valid model name, so not a model",
                        "lowercase letters, digits, '.', '_' and '-' (^[a-z0-9][a-z0-9._-]{0,63}$)",
                    )
                )
    return out


def check_backends(config: AgentConfig) -> list[Check]:
    """Every runtime, then each tenant of the placement the agent will serve: one of its candidates
    (its backend and device, when it has no list) must be available here."""
    from backends import registry
    from backends.base import match_device

    caps = registry.capabilities()
    out = []
    for name, (ok, devices, reason) in caps.items():
        out.append(Check("ok" if ok else "warn", f"backend {name}", ", ".join(devices) if ok else reason))
    placement, source = serving_placement(config)
    for tenant in placement.tenants:
        problems: list[tuple[str, str]] = []  # (fix, detail) of each candidate that cannot serve
        for cand in tenant.candidate_list():
            if cand.backend == "auto" or cand.device.lower() == "auto":
                break  # auto placement picks among what is available
            ok, devices, reason = caps.get(cand.backend, (False, [], "unknown backend"))
            if ok and match_device(devices, cand.device) is not None:
                break
            if not ok:
                hint = registry.info(cand.backend).install_hint() if cand.backend in caps else ""
                fix = f"install it ({hint}) or place the model elsewhere" if hint else ""
                problems.append((fix, f"backend {cand.backend}: {reason}"))
            else:
                present = ", ".join(devices)
                problems.append(("", f"{cand.backend} has no device {cand.device} (present: {present})"))
        else:
            fix, detail = problems[0] if problems else ("", "no candidate")
            out.append(Check("fail", f"placement {tenant.model}", f"{detail}; from the {source}", fix))
    return out


def check_fast_paths() -> list[Check]:
    """The optional native paths the frame pipeline's measured speed depends on."""
    from agent.frames import preprocess

    out = []
    if preprocess.simplejpeg is not None:
        out.append(
            Check("ok", "JPEG decoder", f"libjpeg-turbo via simplejpeg {preprocess.simplejpeg.__version__}")
        )
    else:
        out.append(
            Check(
                "warn",
                "JPEG decoder",
                "Pillow fallback: about 2x the decode cost per frame",
                "pip install simplejpeg (in the agent's environment)",
            )
        )
    if preprocess.cv2 is not None:
        out.append(Check("ok", "resize", f"OpenCV {preprocess.cv2.__version__}"))
    else:
        out.append(
            Check(
                "warn",
                "resize",
                "Pillow fallback: about 5x the crop+resize cost per frame",
                "pip install opencv-python-headless",
            )
        )
    return out


def check_device_nodes() -> list[Check]:
    out = []
    from backends import registry

    patterns = sorted({p for info in registry.declarations().values() for p in info.device_nodes})
    for pattern in patterns:
        for node in sorted(glob.glob(pattern)):
            if os.access(node, os.R_OK | os.W_OK):
                out.append(Check("ok", f"device {node}", "readable and writable"))
                continue
            try:
                group = grp.getgrgid(os.stat(node).st_gid).gr_name
            except (KeyError, OSError):
                group = "its group"
            out.append(
                Check(
                    "fail",
                    f"device {node}",
                    "no read/write access",
                    f"usermod -aG {group} edge-agent (the unit adds video, render, plugdev)",
                )
            )
    if not out:
        out.append(Check("ok", "accelerator device nodes", "none present (CPU only)"))
    return out


def check_broker(config: AgentConfig) -> Check:
    host, port = config.broker.host, config.broker.port
    what = f"broker {host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=5):
            pass
    except OSError as exc:
        return Check(
            "fail",
            what,
            f"cannot connect: {exc}",
            "is the broker running and reachable? (firewall, host, port)",
        )

    async def mqtt_connect() -> None:
        import aiomqtt

        from agent.service.mqtt_session import build_tls_context

        tls = await asyncio.to_thread(build_tls_context, config.broker)
        async with aiomqtt.Client(
            host,
            port,
            username=config.broker.username,
            password=config.broker.password,
            tls_context=tls,
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=5,
        ):
            pass

    try:
        asyncio.run(mqtt_connect())
    except Exception as exc:  # report any failure (TLS, credentials, protocol) as a finding
        return Check(
            "fail",
            what,
            f"MQTT connect refused: {exc}",
            "check broker.username/password and broker.tls in the config",
        )
    return Check("ok", what, "MQTT 5 connect accepted" + (" (TLS)" if config.broker.tls.enabled else ""))


def run(config: AgentConfig, skip_broker: bool = False) -> int:
    checks: list[Check] = [Check("ok", "config", f"device id {config.device_id}")]
    checks.append(check_state_dir(config.state_dir))
    checks += check_models(config)
    checks += check_backends(config)
    checks += check_fast_paths()
    checks += check_device_nodes()
    if not skip_broker:
        checks.append(check_broker(config))
    for c in checks:
        print(f"[{MARK[c.level]}] {c.what}: {c.detail}")
        if c.fix and c.level != "ok":
            print(f"       fix: {c.fix}")
    failed = [c for c in checks if c.level == "fail"]
    print(f"\n{len(checks)} checks, {len(failed)} failed" + ("" if failed else ": ready to serve"))
    return 1 if failed else 0

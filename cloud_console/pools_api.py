"""The pools page and API (docs/pools.md): members, each member's share, pool throughput and latency,
and each pool's scaling target. Routes only: the figures are cloud_console/pools.py's, the scaling
cloud_console/pools_scaler.py's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field

from agent.protocol.topics import MODEL_NAME_RE, valid_pool_name
from cloud_console.pages import _header, _signed_in
from cloud_console.pools_policy import Target
from cloud_console.pools_scaler import PoolScaler
from cloud_console.service import Console


class TargetRequest(BaseModel):
    """A pool's scaling target (cloud_console/pools_policy.py says what each field does)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=MODEL_NAME_RE.pattern)
    auto: bool = True
    fps: float | None = Field(default=None, gt=0, le=100_000)
    min_members: int = Field(default=1, ge=1, le=64)
    max_members: int = Field(default=8, ge=1, le=64)
    up_after_s: float = Field(default=3.0, ge=0, le=3600)
    down_after_s: float = Field(default=30.0, ge=0, le=86400)
    cooldown_s: float = Field(default=10.0, ge=0, le=3600)
    spare_fraction: float = Field(default=0.6, gt=0, lt=1)


def page(user: str, role: str, csrf: str) -> str:
    body = (
        _header(user, role, "/ pools") + '<main class="pools"><section><h2>Device pools</h2>'
        '<p class="note">Members announce themselves every second; figures are over the last 10 s '
        "(docs/pools.md).</p>"
        '<div id="pools"><p>loading…</p></div></section></main>'
    )
    return _signed_in("Pools", body, user, role, csrf, "pools.js")


def pools_api(
    app: FastAPI,
    api: APIRouter,
    console: Console,
    principal: Callable[[Request], Any],
    user: Callable[..., Any],
    admin: Callable[..., Any],
) -> PoolScaler:
    """Add the page and the API (app.py's `principal`, `require_user` and `require_admin` guard
    them); returns the scaler for the app to start and stop."""
    scaler = PoolScaler(console)
    scaler.attach()

    @app.get("/pools", response_class=HTMLResponse, include_in_schema=False)
    async def pools_page(request: Request) -> Response:
        who = principal(request)
        if who is None or who.session is None:
            return RedirectResponse("/login?next=/pools", 303)
        return HTMLResponse(page(who.name, who.role, console.signer.csrf_token(who.session)))

    # (Guards as route dependencies: with postponed annotations FastAPI cannot resolve a local name.)
    @api.get("/pools", tags=["pools"], dependencies=[Depends(user)])
    async def api_pools() -> list[dict[str, Any]]:
        """Every pool: members (open, busy, queue, fps, share, latency), pool fps and latency, the
        measured capacity of one member, the target and the scaler's last decision and actions."""
        return scaler.overview()

    @api.put("/pools/{pool}/target", tags=["pools"], dependencies=[Depends(admin)])
    async def api_pool_target(pool: str, body: TargetRequest) -> dict[str, Any]:
        """Set a pool's scaling target; with `auto` the console adds and removes members itself."""
        if not valid_pool_name(pool):
            raise HTTPException(422, f"{pool!r} is not a pool name")
        if body.min_members > body.max_members:
            raise HTTPException(422, "min_members is above max_members")
        fields = body.model_dump(exclude={"model", "auto"})
        await asyncio.to_thread(scaler.set_target, pool, body.model, Target(**fields), body.auto)
        return {"pool": pool, "model": body.model, "auto": body.auto, **fields}

    return scaler

"""Rollouts and tags over HTTP (docs/fleet.md#rollouts): the REST API, the rollouts page, /metrics.

Wired into the app by `install` (cloud_console/app.py) with the app's own auth dependencies, so the
routes take the same session cookie (with its CSRF token) or API bearer token as every other route;
changes need the admin role.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from html import escape
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field

from cloud_console import pages
from cloud_console.rollout_engine import RolloutEngine
from cloud_console.rollouts import RolloutError, RolloutSpec
from cloud_console.selectors import SelectorError

Op = Literal["pause", "resume", "approve", "abort", "rollback"]


class TagsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tags: dict[str, str] = Field(description='tags the console assigns; "" hides a tag the device reports')


def install(
    app: FastAPI,
    api: APIRouter,
    engine: RolloutEngine,
    require_user: Callable[..., Any],
    require_admin: Callable[..., Any],
    page_principal: Callable[[Request], Any],
) -> None:
    """Add the rollout routes to `api` (before it is included) and the page to `app`."""
    user_dep = Depends(require_user)
    admin_dep = Depends(require_admin)

    @api.get("/rollouts", tags=["rollouts"])
    async def api_rollouts(_who: Any = user_dep) -> list[dict[str, Any]]:
        """Every rollout, newest first, with its device counts by state."""
        return [engine.summary(r) for r in sorted(engine.rollouts.values(), key=lambda r: -r.created_at)]

    @api.post("/rollouts", tags=["rollouts"], status_code=201)
    async def api_create_rollout(body: RolloutSpec, request: Request, who: Any = admin_dep) -> dict[str, Any]:
        """Start a rollout: the devices the selector matches (and that run the model a tenant change
        names) in waves, each judged by the gates after its soak time."""
        base = engine.console.config.public_url or str(request.base_url)
        try:
            rollout = await engine.create(body, who.name, base)
        except RolloutError as exc:
            raise HTTPException(422, str(exc)) from exc
        return engine.detail(rollout)

    @api.get("/rollouts/{rollout_id}", tags=["rollouts"])
    async def api_rollout(rollout_id: str, _who: Any = user_dep) -> dict[str, Any]:
        """A rollout: each wave's devices (state, gate figures, reason) and the timeline."""
        return engine.detail(await _rollout_or_404(engine, rollout_id))

    @api.post("/rollouts/{rollout_id}/{op}", tags=["rollouts"])
    async def api_rollout_command(rollout_id: str, op: Op, who: Any = admin_dep) -> dict[str, Any]:
        """pause | resume | approve (the next wave, with manual promotion) | abort (stop, keep what
        the devices run) | rollback (stop, and restore every device changed so far)."""
        await _rollout_or_404(engine, rollout_id)
        try:
            rollout = await engine.command(rollout_id, op, who.name)
        except RolloutError as exc:
            raise HTTPException(409, str(exc)) from exc
        except KeyError as exc:
            raise HTTPException(404, f"no rollout {rollout_id!r}") from exc
        return engine.summary(rollout)

    @api.get("/devices/{device_id}/tags", tags=["fleet"])
    async def api_tags(device_id: str, _who: Any = user_dep) -> dict[str, Any]:
        """The device's tags: its own (status), the console's, and the two merged."""
        device = engine.console.fleet.devices.get(device_id)
        if device is None:
            raise HTTPException(404, f"no device {device_id!r}")
        return {
            "device_id": device_id,
            "reported": device.status.tags if device.status is not None else {},
            "assigned": engine.assigned.get(device_id, {}),
            "tags": engine.tags_of(device_id),
        }

    @api.put("/devices/{device_id}/tags", tags=["fleet"])
    async def api_set_tags(device_id: str, body: TagsRequest, _who: Any = admin_dep) -> dict[str, Any]:
        """Replace the tags the console assigns to the device (kept in the console's database)."""
        if device_id not in engine.console.fleet.devices:
            raise HTTPException(404, f"no device {device_id!r}")
        try:
            tags = await engine.set_tags(device_id, body.tags)
        except RolloutError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {"device_id": device_id, "assigned": engine.assigned.get(device_id, {}), "tags": tags}

    @api.get("/selectors/match", tags=["fleet"])
    async def api_selector(selector: str = "*", _who: Any = user_dep) -> dict[str, Any]:
        """The device ids a selector matches now (what a rollout or a move would target)."""
        try:
            devices = engine.select(selector)
        except SelectorError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {"selector": selector, "devices": devices, "count": len(devices)}

    @app.get("/rollouts", response_class=HTMLResponse, include_in_schema=False)
    async def rollouts_page(request: Request) -> Response:
        who = page_principal(request)
        if who is None or who.session is None:
            return RedirectResponse("/login?next=/rollouts", 303)
        csrf = engine.console.signer.csrf_token(who.session)
        return HTMLResponse(page(who.name, who.role, csrf))


async def _rollout_or_404(engine: RolloutEngine, rollout_id: str) -> Any:
    try:
        return await engine.find(rollout_id)
    except KeyError as exc:
        raise HTTPException(404, f"no rollout {rollout_id!r}") from exc


def page(user: str, role: str, csrf: str) -> str:
    """The rollouts page: a list, and the chosen rollout's waves, devices, figures and timeline."""
    admin = role == "admin"
    form = (
        '<details class="move" id="create-panel"><summary>Start a rollout</summary>'
        '<form id="create-form" class="inline">'
        '<label>devices <input id="ro-selector" value="*" size="18" title="site=north,id=cam-*"></label>'
        '<label>model <input id="ro-model" required size="16"></label>'
        '<label>version <input id="ro-version" size="6"></label>'
        '<label>waves <input id="ro-waves" value="1,10%,50%,all" size="12"></label>'
        '<label>soak s <input id="ro-soak" value="60" size="4"></label>'
        '<label><input id="ro-manual" type="checkbox"> approve each wave</label>'
        '<button type="submit" id="ro-submit">Start</button></form>'
        '<p id="create-result" class="result"></p></details>'
        if admin
        else ""
    )
    body = (
        pages._header(user, role, "/ rollouts") + '<main class="rollouts">'
        f"{form}"
        '<table id="rollouts" class="grid"><thead><tr><th>rollout</th><th>state</th><th>change</th>'
        '<th>devices</th><th class="num">wave</th><th>counts</th><th>created</th></tr></thead>'
        '<tbody id="rollouts-body"><tr><td colspan="7">loading…</td></tr></tbody></table>'
        '<section id="rollout" hidden><h2 id="ro-title"></h2>'
        '<p id="ro-state" class="counts"></p><p id="ro-reason" class="error"></p>'
        f'<p id="ro-actions"{"" if admin else " hidden"}>'
        + "".join(
            f'<button type="button" data-op="{op}" id="ro-{op}">{escape(op)}</button> '
            for op in ("pause", "resume", "approve", "abort", "rollback")
        )
        + '</p><div id="ro-waves-list"></div><h3>timeline</h3><ol id="ro-timeline"></ol></section>'
        "</main>"
    )
    return pages._signed_in("Rollouts", body, user, role, csrf, "rollouts.js")


class RolloutCollector(Collector):
    """Rollout figures on the console's fleet /metrics (docs/monitoring.md)."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        states = GaugeMetricFamily("edge_fleet_rollouts", "Rollouts by state.", labels=["state"])
        by_state: dict[str, int] = {}
        devices = GaugeMetricFamily(
            "edge_fleet_rollout_devices", "A rollout's devices by state.", labels=["rollout", "state"]
        )
        rollback = GaugeMetricFamily(
            "edge_fleet_rollout_rollback_seconds",
            "From the gate failing to every online device of the wave serving its placement before.",
            labels=["rollout"],
        )
        for rollout in self.engine.rollouts.values():
            by_state[rollout.state] = by_state.get(rollout.state, 0) + 1
            for state, count in sorted(rollout.counts().items()):
                devices.add_metric([rollout.id, state], count)
            if rollout.failed_at is not None and rollout.rolled_back_at is not None:
                rollback.add_metric([rollout.id], rollout.rolled_back_at - rollout.failed_at)
        for state, count in sorted(by_state.items()):
            states.add_metric([state], count)
        events = CounterMetricFamily(
            "edge_fleet_rollout_events", "Rollout timeline events since the console started.", labels=["kind"]
        )
        for kind, count in sorted(self.engine.events.items()):
            events.add_metric([kind], count)
        placed = CounterMetricFamily(
            "edge_fleet_rollout_placements",
            "Placements rollouts published since the console started (forward or rollback).",
            labels=["purpose"],
        )
        for purpose in ("forward", "rollback"):
            placed.add_metric([purpose], self.engine.placements[purpose])
        yield from (states, devices, rollback, events, placed)

"""The web app: pages, JSON API (OpenAPI at /openapi.json), server-sent events, login.

Security model:
- every page and API call but /login, /healthz and /static needs a signed session cookie
  (HttpOnly, SameSite=Strict; Secure when `web.secure_cookies`); API calls may instead carry an API
  token (`Authorization: Bearer ect_...`, cloud_console/tokens.py), scoped to a role;
- every POST/PUT/DELETE with a session needs its CSRF token in the `X-CSRF-Token` header and, when
  the browser sends an Origin, the same origin (a bearer token needs neither: a browser never adds
  one to a cross-site request by itself);
- changing placement needs the admin role (403 for viewers);
- pages load only the console's own scripts (Content-Security-Policy: 'self', no CDN).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from agent.protocol.editing import PlacementInvalid
from agent.protocol.schemas import Placement, TenantSpec
from cloud_console import pages
from cloud_console.auth import Session, password_binding
from cloud_console.config import Role
from cloud_console.events import format_event
from cloud_console.fleet import MAX_PAGE, PLACEMENT_STATES, SORT_KEYS, STATES, BadQuery, FleetQuery
from cloud_console.model_store import ModelRejected
from cloud_console.mqtt import PublishFailed
from cloud_console.pools_api import pools_api
from cloud_console.prometheus import fleet_registry
from cloud_console.prometheus import render as render_metrics
from cloud_console.rollout_api import RolloutCollector
from cloud_console.rollout_api import install as install_rollouts
from cloud_console.rollout_engine import RolloutEngine
from cloud_console.selectors import SelectorError
from cloud_console.service import Console, UnknownDevice
from cloud_console.tokens import TokenError, effective_role

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
COOKIE = "edge_console_session"
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = {"POST", "PUT", "DELETE", "PATCH"}
LOGIN_FAILURE_DELAY_S = 0.5
# Burn the same argon2 work for unknown users, so login timing does not reveal who exists.
_DUMMY_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$xbqIL1bKqYxvIWFZ9HinSw$i8XWOPMJxTPG4F5b4Su1aYQ1sk+NOTClha418RVEdAw"
)
# Both ways in, as the OpenAPI document shows them (the checks are in `principal`).
BEARER = HTTPBearer(
    auto_error=False, description="An API token: `edge-console token create` or POST /api/tokens"
)
COOKIE_AUTH = APIKeyCookie(
    name="edge_console_session", auto_error=False, description="The session cookie of POST /api/login"
)
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


MAX_BODY_BYTES = 1024 * 1024  # the largest real request, a placement for 32 tenants, is ~10 KB
# A model upload (POST /api/models, docs/fleet.md) is streamed to a file, not held in memory.
MAX_MODEL_BYTES = 4 * 1024**3


class SecurityHeaders:
    """Pure ASGI middleware (no buffering, so event streams flow): adds the headers above, and
    answers a request body over MAX_BODY_BYTES with 413 before it is held in memory (login takes
    bodies before anyone is authenticated)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = MAX_MODEL_BYTES if scope.get("path") == "/api/models" else MAX_BODY_BYTES
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._too_large(send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a chunked body that keeps going
                    raise _TooLarge
            return message

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        try:
            await self.app(scope, limited, send_with_headers)
        except _TooLarge:
            await self._too_large(send)

    @staticmethod
    async def _too_large(send: Send) -> None:
        body = json.dumps({"detail": f"request body over {MAX_BODY_BYTES} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), *SECURITY_HEADERS]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


# -- API models (also the OpenAPI document) -------------------------------------------------------
class LoginRequest(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class SessionInfo(BaseModel):
    user: str
    role: Role
    csrf_token: str


class PlacementRequest(BaseModel):
    """The tenants wanted on the device; the console picks the generation (a field it does not
    know, `generation` included, is a 422, not silently ignored)."""

    model_config = ConfigDict(extra="forbid")
    tenants: list[TenantSpec] = Field(max_length=64)


class Tracking(BaseModel):
    generation: int | None
    state: str = Field(description="none | pending | applied | failed | refused | superseded")
    reason: str
    problems: list[str]


class PlacementResponse(BaseModel):
    device_id: str
    generation: int
    document: Placement
    tracking: Tracking


class MoveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    from_backend: str
    to_backend: str
    to_device: str | None = Field(default=None, description="default: the target backend's first device")
    from_device: str | None = Field(default=None, description="only tenants on this device of from_backend")
    selector: str = Field(
        default="", description="only devices this selector matches (docs/fleet.md#selectors)"
    )


class MovePublished(BaseModel):
    device_id: str
    generation: int


class MoveSkipped(BaseModel):
    device_id: str
    reason: str


class MoveResponse(BaseModel):
    published: list[MovePublished]
    skipped: list[MoveSkipped]


class TenantRow(BaseModel):
    model: str
    backend: str
    device: str
    instances: int
    state: str
    error: str | None
    fps: float | None
    p95_ms: float | None
    queue_depth: int | None
    drops: int | None
    errors: int | None


class DeviceSummary(BaseModel):
    device_id: str
    online: bool
    stale: bool
    agent_version: str | None
    last_seen: float
    tenants: list[TenantRow]
    fps: float
    p95_ms: float
    queue_depth: int
    drops: int
    errors: int
    status_errors: int
    last_error: str | None
    applied_generation: int | None
    placement: Tracking
    silent: bool = Field(description="marked offline by the console: nothing arrived for offline_after_s")
    tags: dict[str, str] = Field(description="the device's tags (its own and those the console assigned)")
    broker: str | None = Field(description="the broker node the device is connected to (host:port)")


class FleetCounts(BaseModel):
    total: int
    online: int = Field(description="online and heard from within stale_after_s")
    stale: int = Field(description="claims online, silent for more than stale_after_s")
    offline: int
    silent: int = Field(description="offline because nothing arrived for offline_after_s (no will seen)")
    failover: int = Field(description="with a tenant serving off its first candidate")
    pending: int = Field(description="placements published and not yet applied")
    refused: int
    failed: int = Field(description="placements applied with failed tenants")


class DeviceList(BaseModel):
    devices: list[DeviceSummary] = Field(description="rows offset..offset+limit of those matched")
    matched: int = Field(description="devices that pass the filters")
    total: int = Field(description="devices in the fleet")
    offset: int
    limit: int
    counts: FleetCounts = Field(description="fleet-wide, whatever the filters")
    facets: dict[str, dict[str, int]] | None = Field(
        default=None, description="with facets=true: devices per model and per backend"
    )
    stats: dict[str, Any]


class WatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    devices: list[str] = Field(max_length=MAX_PAGE, description="the device ids the page shows")


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, description="what the token is for (a label)")
    role: Role | None = Field(default=None, description="at most your own role (default: your role)")


class TokenInfo(BaseModel):
    id: str
    user: str
    role: Role
    name: str
    created: float
    last_used: float | None
    revoked: float | None


class TokenCreated(TokenInfo):
    token: str = Field(description="the bearer token: shown this once, only its hash is kept")


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    session: Session | None  # None for an API token
    token_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# -- who is asking (module level: FastAPI resolves these annotations by name; the dependencies are
# async so that FastAPI runs them on the event loop, not in its thread pool) -------------------------
def get_console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def principal(request: Request) -> Principal | None:
    console = get_console(request)
    scheme, _, credential = (request.headers.get("authorization") or "").partition(" ")
    # A bearer token, and only the token, decides (no fallback to a cookie). Another scheme (a
    # reverse proxy's Basic auth, forwarded) is not ours: the session cookie decides then.
    if scheme.lower() == "bearer":
        identity = console.tokens.authenticate(credential.strip())
        token_user = console.users.get(identity.user) if identity is not None else None
        if identity is None or token_user is None:
            return None
        role: Role = "admin" if effective_role(identity.role, token_user.role) == "admin" else "viewer"
        return Principal(token_user.name, role, None, identity.token_id)
    session = console.signer.read(request.cookies.get(COOKIE))
    if session is None:
        return None
    user = console.users.get(session.user)
    if user is None or not hmac.compare_digest(session.key, password_binding(user.password_hash)):
        return None  # unknown user, or the password changed since this session logged in
    return Principal(user.name, user.role, session)


async def require_user(
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
    _cookie: Annotated[str | None, Depends(COOKIE_AUTH)],
) -> Principal:
    who = principal(request)
    if who is None:
        raise HTTPException(
            401,
            "invalid or revoked API token"
            if request.headers.get("authorization", "").lower().startswith("bearer ")
            else "log in first",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return who


async def require_session(who: Annotated[Principal, Depends(require_user)]) -> Principal:
    """Managing tokens needs a login: a token cannot make more tokens."""
    if who.session is None:
        raise HTTPException(403, "API tokens are managed from a login session, not with a token")
    return who


def same_origin(request: Request) -> bool:
    """No Origin (curl, scripts) passes; a browser's Origin must be this host."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return origin != "null" and urlsplit(origin).netloc == request.headers.get("host")


async def guard_changes(request: Request) -> None:
    """CSRF: every unsafe method carries the session's token (and a same-origin Origin)."""
    if request.method not in UNSAFE_METHODS or request.url.path in ("/api/login", "/login"):
        return
    who = principal(request)
    if who is None:
        raise HTTPException(401, "log in first", headers={"WWW-Authenticate": "Bearer"})
    if who.session is None:
        return  # an API token: no cookie, so nothing a cross-site request could ride on
    if not same_origin(request):
        raise HTTPException(403, "cross-origin request refused")
    if not get_console(request).signer.check_csrf(who.session, request.headers.get(CSRF_HEADER)):
        raise HTTPException(403, "CSRF token missing or invalid")


async def require_admin(who: Annotated[Principal, Depends(require_user)]) -> Principal:
    if not who.is_admin:
        raise HTTPException(403, "the admin role is needed for this change (placements, models)")
    return who


User = Annotated[Principal, Depends(require_user)]
Admin = Annotated[Principal, Depends(require_admin)]
LoggedIn = Annotated[Principal, Depends(require_session)]


def create_app(console: Console) -> FastAPI:
    """The FastAPI app around a Console, which it starts and stops with the server.

    Every handler is `async def`: FastAPI runs plain `def` handlers in a thread pool, and the fleet
    state they read is mutated by MQTT ingest on the event loop. On the loop, no locks are needed."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await console.start()
        await rollouts.start()
        pools.start()  # automatic pool scaling (docs/pools.md)
        try:
            yield
        finally:
            await pools.stop()
            await rollouts.stop()
            await console.stop()

    app = FastAPI(
        title="edge-agent console",
        version="0.1.0",
        description=(
            "Fleet view and placement control for edge-agent devices, over MQTT (docs/protocol.md). "
            "Authenticate with the session cookie of POST /api/login (changes then need its csrf_token "
            "in X-CSRF-Token), or with an API token: `Authorization: Bearer ect_...` (POST /api/tokens "
            "or `edge-console token create`; no CSRF token needed)."
        ),
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads from a CDN; the console serves no third-party origin
        redoc_url=None,
    )
    app.state.console = console
    rollouts = app.state.rollouts = RolloutEngine(console)  # staged rollouts and tags (docs/fleet.md)
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    def set_session_cookie(response: Response, user: str) -> SessionInfo:
        cookie, session = console.signer.issue(user, password_binding(console.users[user].password_hash))
        response.set_cookie(
            COOKIE,
            cookie,
            max_age=console.config.web.session_max_age_s,
            httponly=True,
            samesite="strict",
            secure=console.config.web.secure_cookies,
            path="/",
        )
        return SessionInfo(
            user=user, role=console.users[user].role, csrf_token=console.signer.csrf_token(session)
        )

    # argon2 takes 64 MiB and a fraction of a second of CPU per attempt: at most two at a time, so a
    # flood of logins queues here instead of exhausting memory and the threads others need.
    hashing = asyncio.Semaphore(2)

    async def check_login(username: str, password: str) -> bool:
        user = console.users.get(username)
        # Off the event loop, so ingest keeps flowing. An old (weaker) hash is upgraded once the
        # password is known to be right.
        stored = user.password_hash if user else _DUMMY_HASH
        async with hashing:
            ok = await asyncio.to_thread(console.passwords.login, username[:64], stored, password)
        if not (ok and user):
            log.warning("failed login for %r", username[:64])
            await asyncio.sleep(LOGIN_FAILURE_DELAY_S)
            return False
        log.info("login: %s (%s)", user.name, user.role)
        return True

    # -- public ---------------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, Any]:
        """Liveness for scripts and load balancers (no login): HTTP is up; is MQTT connected?"""
        return {
            "ok": True,
            "mqtt_connected": console.mqtt.connected.is_set(),
            "mqtt_broker": console.mqtt.broker,  # the broker node in use (or tried next)
            "devices": len(console.fleet.devices),
        }

    metrics_registry = fleet_registry(console.fleet)
    metrics_registry.register(RolloutCollector(rollouts))

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics(_who: User) -> Response:
        """Fleet-wide Prometheus metrics from every device's telemetry (docs/monitoring.md); scrape
        with an API token (`Authorization: Bearer ...`)."""
        return Response(render_metrics(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_page(request: Request, error: str = "", next: str = "/") -> Response:
        if principal(request) is not None:
            return RedirectResponse(_safe_next(next), 303)
        return HTMLResponse(pages.login(error=bool(error), next_url=_safe_next(next)))

    @app.post("/login", include_in_schema=False)
    async def login_form(request: Request) -> Response:
        """The HTML form (urlencoded; parsed here, no python-multipart needed)."""
        if not same_origin(request):
            raise HTTPException(403, "cross-origin request refused")
        form = parse_qs((await request.body())[:8192].decode(errors="replace"))
        username = form.get("username", [""])[0][:64]
        password = form.get("password", [""])[0][:1024]
        next_url = _safe_next(form.get("next", ["/"])[0])
        if not await check_login(username, password):
            return RedirectResponse(f"/login?error=1&next={quote(next_url)}", 303)
        response = RedirectResponse(next_url, 303)
        set_session_cookie(response, username)
        return response

    # -- pages ----------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def fleet_page(request: Request) -> Response:
        who = principal(request)
        if who is None or who.session is None:  # pages are for a login session, not a token
            return RedirectResponse("/login?next=/", 303)
        return HTMLResponse(pages.fleet(who.name, who.role, console.signer.csrf_token(who.session)))

    @app.get("/devices/{device_id}", response_class=HTMLResponse, include_in_schema=False)
    async def device_page(request: Request, device_id: str) -> Response:
        who = principal(request)
        if who is None or who.session is None:
            return RedirectResponse(f"/login?next={quote('/devices/' + device_id)}", 303)
        if device_id not in console.fleet.devices:
            return HTMLResponse(pages.not_found(device_id, who.name, who.role), 404)
        return HTMLResponse(
            pages.device(device_id, who.name, who.role, console.signer.csrf_token(who.session))
        )

    @app.get("/tokens", response_class=HTMLResponse, include_in_schema=False)
    async def tokens_page(request: Request) -> Response:
        who = principal(request)
        if who is None or who.session is None:
            return RedirectResponse("/login?next=/tokens", 303)
        return HTMLResponse(pages.tokens(who.name, who.role, console.signer.csrf_token(who.session)))

    @app.get("/models", response_class=HTMLResponse, include_in_schema=False)
    async def models_page(request: Request) -> Response:
        who = principal(request)
        if who is None or who.session is None:
            return RedirectResponse("/login?next=/models", 303)
        return HTMLResponse(pages.models(who.name, who.role, console.signer.csrf_token(who.session)))

    # -- API ------------------------------------------------------------------------------------
    api = APIRouter(prefix="/api", dependencies=[Depends(guard_changes)])

    @api.post("/login", response_model=SessionInfo, tags=["session"])
    async def api_login(body: LoginRequest, request: Request, response: Response) -> SessionInfo:
        """Log in; sets the session cookie and returns the CSRF token for changes."""
        if not same_origin(request):
            raise HTTPException(403, "cross-origin request refused")
        if not await check_login(body.username, body.password):
            raise HTTPException(401, "wrong user name or password")
        return set_session_cookie(response, body.username)

    @api.post("/logout", tags=["session"])
    async def api_logout(who: LoggedIn, response: Response) -> dict[str, bool]:
        assert who.session is not None  # require_session
        console.signer.revoke(who.session)
        response.delete_cookie(COOKIE, path="/")
        return {"ok": True}

    @api.get("/session", response_model=SessionInfo, tags=["session"])
    async def api_session(who: User) -> SessionInfo:
        """Who is asking. With an API token the CSRF token is empty (none is needed)."""
        csrf = console.signer.csrf_token(who.session) if who.session is not None else ""
        return SessionInfo(user=who.name, role=who.role, csrf_token=csrf)

    @api.get("/tokens", response_model=list[TokenInfo], tags=["tokens"])
    async def api_tokens(who: LoggedIn) -> list[dict[str, Any]]:
        """API tokens with their last use: your own; an admin sees everyone's."""
        return await asyncio.to_thread(console.tokens.list, None if who.is_admin else who.name)

    @api.post("/tokens", response_model=TokenCreated, status_code=201, tags=["tokens"])
    async def api_create_token(body: TokenRequest, who: LoggedIn) -> dict[str, Any]:
        """Make an API token for yourself, scoped to your role or below. The token is in this answer
        only: send it as `Authorization: Bearer <token>`; no CSRF token is needed with it."""
        role = body.role or who.role
        if role == "admin" and not who.is_admin:
            raise HTTPException(403, "a token cannot have more than your own role")
        try:
            token, row = await asyncio.to_thread(console.tokens.create, who.name, role, body.name)
        except TokenError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {**row, "token": token}

    @api.delete("/tokens/{token_id}", tags=["tokens"])
    async def api_revoke_token(token_id: str, who: LoggedIn) -> dict[str, bool]:
        """Revoke a token (yours; an admin may revoke anyone's). It stops working at once."""
        owner = await asyncio.to_thread(console.tokens.owner, token_id)
        if owner is None or (owner != who.name and not who.is_admin):
            raise HTTPException(404, f"no token {token_id!r}")
        await asyncio.to_thread(console.tokens.revoke, token_id)
        return {"ok": True}

    @api.get("/devices", tags=["fleet"], responses={200: {"model": DeviceList}})
    async def api_devices(
        _who: User,
        q: Annotated[
            str,
            Query(
                max_length=200,
                description="substring of id, model, backend, device, state, or a key:value tag",
            ),
        ] = "",
        id_: Annotated[str, Query(alias="id", max_length=200, description="substring of the device id")] = "",
        state: Annotated[str | None, Query(description=f"one of {', '.join(STATES)}")] = None,
        online: bool | None = None,
        model: Annotated[str | None, Query(max_length=200, description="runs this model")] = None,
        backend: Annotated[str | None, Query(max_length=200, description="a tenant on this backend")] = None,
        tag: Annotated[str | None, Query(max_length=200, description="key:value (or key: any value)")] = None,
        failover: Annotated[bool | None, Query(description="a tenant off its first candidate")] = None,
        placement: Annotated[
            str | None, Query(description=f"its placement: one of {', '.join(PLACEMENT_STATES)}")
        ] = None,
        sort: Annotated[str, Query(description=f"one of {', '.join(sorted(SORT_KEYS))}")] = "device_id",
        desc: bool = False,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=0, le=MAX_PAGE)] = 100,
        facets: bool = False,
        selector: Annotated[str, Query(max_length=1000, description="docs/fleet.md#selectors")] = "",
    ) -> JSONResponse:
        """One page of the fleet table, filtered and sorted on the server, with fleet-wide counts.
        Every filter given must hold (a `selector` of tags and ids too); `matched` says how many
        devices passed them."""
        try:
            ids = frozenset(rollouts.select(selector)) if selector.strip() else None
        except SelectorError as exc:
            raise HTTPException(422, str(exc)) from exc
        try:
            query = FleetQuery(
                q=q,
                device_id=id_,
                state=state,
                online=online,
                model=model,
                backend=backend,
                tag=tag,
                failover=failover,
                placement=placement,
                sort=sort,
                desc=desc,
                offset=offset,
                limit=limit,
                facets=facets,
                ids=ids,
            )
            page = console.fleet.page(query)
        except BadQuery as exc:
            raise HTTPException(422, str(exc)) from exc
        return JSONResponse({**page, "stats": console.stats()})

    @api.get("/fleet/capabilities", tags=["fleet"])
    async def api_fleet_capabilities(_who: User) -> dict[str, Any]:
        """What the fleet can run: models and available backends (with devices) over all devices,
        and the (model, backend) pairs running now: the choices of the fleet-wide move."""
        return console.fleet_capabilities()

    @api.get("/devices/{device_id}", tags=["device"])
    async def api_device(device_id: str, _who: User) -> dict[str, Any]:
        """Status, capabilities, latest telemetry, desired placement and where it stands."""
        return console.detail(_device_or_404(console, device_id))

    @api.get("/devices/{device_id}/telemetry", tags=["device"])
    async def api_telemetry(
        device_id: str,
        _who: User,
        window_s: Annotated[float, Query(gt=0, le=7 * 86400)] = 600.0,
    ) -> dict[str, Any]:
        """History points for the charts: one per telemetry message, tenants keyed by model."""
        _device_or_404(console, device_id)
        since = time.time() - window_s
        rows = await asyncio.to_thread(console.store.telemetry_since, device_id, since)
        points: list[dict[str, Any]] = []
        for row in rows:
            if not points or points[-1]["ts"] != row["ts"]:
                points.append({"ts": row["ts"], "tenants": {}})
            points[-1]["tenants"][row["model"]] = {
                "backend": row["backend"],
                "device": row["device"],
                "fps": row["fps"],
                "p95_ms": row["p95_ms"],
                "queue_depth": row["queue_depth"],
            }
        return {"device_id": device_id, "points": points[-2000:]}

    @api.get("/devices/{device_id}/placements", tags=["device"])
    async def api_placement_log(device_id: str, _who: User) -> dict[str, Any]:
        """Placements this console published to the device (audit log, newest first)."""
        rows = await asyncio.to_thread(console.store.placements_of, device_id)
        return {"device_id": device_id, "placements": rows}

    @api.put("/devices/{device_id}/placement", response_model=PlacementResponse, tags=["placement"])
    async def api_put_placement(
        device_id: str, body: PlacementRequest, request: Request, who: Admin
    ) -> PlacementResponse:
        """Publish a desired placement (retained, QoS 1); generation = max(applied, desired) + 1.

        A model version the device lacks and the model store has is delivered first, and the placement
        published once the device reports it installed. 422 when the device cannot run it (per its
        reported capabilities) or the delivery failed; 503 when the broker is down."""
        _device_or_404(console, device_id)
        try:  # a version the device lacks is delivered from the model store first (docs/fleet.md)
            base = console.config.public_url or str(request.base_url)
            await console.deliver_missing(device_id, body.tenants, base, who.name)
        except PlacementInvalid as exc:
            raise HTTPException(422, str(exc)) from exc
        except PublishFailed as exc:
            raise HTTPException(503, str(exc)) from exc
        return await _publish(console.publish_placement(device_id, body.tenants, who.name, "edit"), device_id)

    @api.post("/devices/{device_id}/auto-place", response_model=PlacementResponse, tags=["placement"])
    async def api_auto_place(device_id: str, who: Admin) -> PlacementResponse:
        """Publish the device's tenants with backend "auto": the agent chooses, or refuses (see tracking)."""
        _device_or_404(console, device_id)
        return await _publish(console.auto_place(device_id, who.name), device_id)

    @api.post("/fleet/move", response_model=MoveResponse, tags=["placement"])
    async def api_move(body: MoveRequest, who: Admin) -> MoveResponse:
        """Move model M from backend X to Y on every device that runs it on X."""
        if not console.mqtt.connected.is_set():
            raise HTTPException(503, "not connected to the MQTT broker")
        try:
            only = set(rollouts.select(body.selector)) if body.selector.strip() else None
        except SelectorError as exc:
            raise HTTPException(422, str(exc)) from exc
        outcome = await console.move_model(
            body.model, body.from_backend, body.to_backend, body.to_device, body.from_device, who.name, only
        )
        if not outcome.published and not outcome.skipped:
            where = f"{body.from_backend}:{body.from_device}" if body.from_device else body.from_backend
            raise HTTPException(
                404, f"no device runs {body.model} on {where} (or it is already on {body.to_backend})"
            )
        return MoveResponse.model_validate({"published": outcome.published, "skipped": outcome.skipped})

    @api.get("/stats", tags=["health"])
    async def api_stats(_who: User) -> dict[str, Any]:
        """Ingest figures: messages/s, backlog (MQTT queue), database rows pending."""
        return console.stats()

    @api.get("/events", tags=["fleet"], response_class=StreamingResponse)
    async def api_events(
        request: Request, who: User, device: str | None = None, watch: bool = False
    ) -> StreamingResponse:
        """Server-sent events: `fleet` (once a second: fleet-wide counts and the changed rows) or,
        with `device`, its `device` (status changed) and `telemetry` events. With `watch=true` a
        fleet stream carries only the rows of the devices named with POST /api/events/{stream}/watch
        (the page's visible rows); its id is in the first event, `hello`. The stream ends when its
        session does (logout)."""
        sub = console.hub.subscribe(device, owner=who.name, watch=set() if watch and device is None else None)

        async def stream() -> AsyncIterator[str]:
            checked = time.monotonic()
            try:
                yield "retry: 2000\n\n"
                yield format_event("hello", {"device": device, "stream": sub.stream_id})
                while True:
                    try:
                        text = await asyncio.wait_for(sub.queue.get(), timeout=15.0)
                    except TimeoutError:
                        text = ": keepalive\n\n"
                    if text is None:
                        return
                    if time.monotonic() - checked > 2.0:
                        checked = time.monotonic()
                        if principal(request) is None:
                            return
                    yield text
            finally:
                console.hub.unsubscribe(sub)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @api.post("/events/{stream_id}/watch", tags=["fleet"])
    async def api_watch(stream_id: str, body: WatchRequest, who: User) -> dict[str, int]:
        """Which rows a fleet stream (opened with `watch=true`) carries: the devices a page shows.
        The counts come whatever it watches."""
        sub = console.hub.find(stream_id)
        if sub is None or sub.owner != who.name or sub.device_id is not None:
            raise HTTPException(404, "no such event stream (it may have ended: open another)")
        sub.watch = set(body.devices)
        return {"watching": len(sub.watch)}

    models_api(api, console)
    pools = pools_api(app, api, console, principal, require_user, require_admin)
    install_rollouts(app, api, rollouts, require_user, require_admin, principal)
    app.include_router(api)
    return app


async def _publish(job: Awaitable[tuple[Placement, Any]], device_id: str) -> PlacementResponse:
    """Map the service's errors to HTTP at the boundary."""
    try:
        doc, tracking = await job
    except PlacementInvalid as exc:
        raise HTTPException(422, str(exc)) from exc
    except PublishFailed as exc:
        raise HTTPException(503, str(exc)) from exc
    return PlacementResponse(
        device_id=device_id,
        generation=doc.generation,
        document=doc,
        tracking=Tracking.model_validate(tracking.as_dict()),
    )


def _device_or_404(console: Console, device_id: str) -> Any:
    try:
        return console.device(device_id)
    except UnknownDevice as exc:
        raise HTTPException(404, f"no device {device_id!r}") from exc


def _safe_next(url: str) -> str:
    """Only local paths after login (no open redirect to another site)."""
    if not url.startswith("/") or url.startswith("//") or "\\" in url:
        return "/"
    return url


class DeliverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    version: str | None = None  # None: the newest in the store


def models_api(api: APIRouter, console: Console) -> None:
    """The model store and delivery (docs/fleet.md)."""

    @api.get("/models", tags=["models"])
    async def api_models(_who: User) -> list[dict[str, Any]]:
        """Every uploaded version, with the devices whose status lists it installed."""
        entries = await asyncio.to_thread(console.models.list)
        where = console.installed_on()
        return [{**e, "devices": where.get((e["name"], e["version"]), [])} for e in entries]

    @api.post("/models", tags=["models"], status_code=201)
    async def api_upload_model(request: Request, who: Admin) -> dict[str, Any]:
        """Upload a model version: the body is a tar (or tar.gz) of the model folder."""
        console.models.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=console.models.root, prefix=".upload-", suffix=".tar") as tmp:
            async for chunk in request.stream():
                await asyncio.to_thread(tmp.write, chunk)
            await asyncio.to_thread(tmp.flush)
            try:
                return await asyncio.to_thread(console.models.add_archive, Path(tmp.name), who.name)
            except ModelRejected as exc:
                raise HTTPException(422, f"not accepted: {exc}") from exc

    @api.delete("/models/{name}/{version}", tags=["models"])
    async def api_delete_model(name: str, version: str, _who: Admin) -> dict[str, bool]:
        """Remove a version from the store (devices keep what they installed)."""
        try:
            await asyncio.to_thread(console.models.delete, name, version)
        except ModelRejected as exc:
            raise HTTPException(404, str(exc)) from exc
        return {"deleted": True}

    @api.get("/blobs/{sha256}", tags=["models"], include_in_schema=False)
    async def api_blob(sha256: str, _who: User) -> FileResponse:
        """One stored file, by its sha256 (devices fetch with Range to resume)."""
        path = console.models.blob(sha256)
        if path is None:
            raise HTTPException(404, "no such file")
        return FileResponse(path, media_type="application/octet-stream")

    @api.post("/devices/{device_id}/models", tags=["models"])
    async def api_deliver(
        device_id: str, body: DeliverRequest, request: Request, who: Admin
    ) -> dict[str, Any]:
        """Tell the device to fetch a version from this console; progress shows in its status."""
        _device_or_404(console, device_id)
        version = body.version or await asyncio.to_thread(console.models.newest, body.model)
        if version is None:
            raise HTTPException(404, f"no model {body.model!r} in the store")
        base = console.config.public_url or str(request.base_url)
        try:
            doc = await console.deliver(device_id, body.model, version, base, who.name)
        except ModelRejected as exc:
            raise HTTPException(404, str(exc)) from exc
        except PublishFailed as exc:
            raise HTTPException(503, str(exc)) from exc
        return doc.model_dump(mode="json")

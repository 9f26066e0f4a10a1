"""API tokens: per-user bearer credentials for scripts and CI, kept in the console's database.

A token reads `ect_<id>_<secret>`. It is shown once, when made; the database keeps only the SHA-256
of the secret (the secret is 256 random bits, so a fast hash is enough: there is nothing to guess),
the user it acts for, the role it is scoped to, a label, when it was made and last used, and whether
it was revoked. A token never grants more than its user's role in the current config: a token made
as admin acts as a viewer once its user is demoted, and stops working when the user is removed.

The role check happens per request in the app; a request with a token needs no CSRF token (a browser
never sends an Authorization header by itself, so a forged cross-site request cannot carry one).
Workers sharing the database see each other's tokens and revocations at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cloud_console import db as schema
from cloud_console.db import migrate, open_engine

log = logging.getLogger(__name__)

PREFIX = "ect"
LAST_USE_EVERY_S = 30.0  # last use is written at most this often per token (reads stay cheap)
ROLE_RANK = {"viewer": 0, "admin": 1}


class TokenError(ValueError):
    """A token that cannot be made or revoked; the message says why."""


@dataclass(frozen=True)
class TokenIdentity:
    """Who a valid token acts for, and the role it was made with (capped by the user's role later)."""

    token_id: str
    user: str
    role: str


def _digest(secret: str) -> str:
    return hashlib.sha256(b"edge-console-token:" + secret.encode()).hexdigest()


def parse(token: str) -> tuple[str, str] | None:
    """`ect_<id>_<secret>` -> (id, secret), or None for anything else."""
    prefix, sep, rest = token.partition("_")
    token_id, sep2, secret = rest.partition("_")
    if prefix != PREFIX or not sep or not sep2 or len(token_id) != 16 or len(secret) < 32:
        return None
    return token_id, secret


def effective_role(token_role: str, user_role: str) -> str:
    """The lower of the two: a token never grants more than its user has now."""
    return token_role if ROLE_RANK.get(token_role, 0) <= ROLE_RANK.get(user_role, 0) else user_role


T = schema.api_tokens
LISTED = ("id", "user", "role", "name", "created", "last_used", "revoked")


class TokenStore:
    def __init__(self, db: Engine | str | Path) -> None:
        """On the console's engine, or opened (and migrated) from a path or URL (the CLI)."""
        self._owned = not isinstance(db, Engine)
        self._db = db if isinstance(db, Engine) else open_engine(db)
        if self._owned:
            migrate(self._db)
        self._lock = threading.Lock()
        self._last_written: dict[str, float] = {}

    def create(self, user: str, role: str, name: str) -> tuple[str, dict[str, Any]]:
        """A new token for `user` scoped to `role`: (the token, shown once; its listing row)."""
        if role not in ROLE_RANK:
            raise TokenError(f"role must be one of {', '.join(ROLE_RANK)}")
        name = name.strip()
        if not 1 <= len(name) <= 64:
            raise TokenError("a token needs a name of 1 to 64 characters (what it is for)")
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        now = time.time()
        with self._db.begin() as conn:
            conn.execute(
                sa.insert(T).values(
                    id=token_id, user=user, role=role, name=name, hash=_digest(secret), created=now
                )
            )
        log.info("API token %s (%s) made for %s, role %s", token_id, name, user, role)
        row = {"id": token_id, "user": user, "role": role, "name": name, "created": now}
        return f"{PREFIX}_{token_id}_{secret}", {**row, "last_used": None, "revoked": None}

    def list(self, user: str | None = None) -> list[dict[str, Any]]:
        """Tokens (never their secrets), newest first; all users' when `user` is None."""
        query = sa.select(*(T.c[k] for k in LISTED)).order_by(T.c.created.desc())
        if user is not None:
            query = query.where(T.c.user == user)
        with self._db.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def owner(self, token_id: str) -> str | None:
        with self._db.connect() as conn:
            found = conn.scalar(sa.select(T.c.user).where(T.c.id == token_id))
        return str(found) if found is not None else None

    def revoke(self, token_id: str) -> bool:
        """Revoke one token (at once, for every process on the database). False if unknown."""
        with self._db.begin() as conn:
            done = conn.execute(
                sa.update(T).where(T.c.id == token_id, T.c.revoked.is_(None)).values(revoked=time.time())
            ).rowcount
            known = conn.scalar(sa.select(T.c.id).where(T.c.id == token_id))
        if done:
            log.info("API token %s revoked", token_id)
        return known is not None

    def revoke_all_but(self, users: set[str]) -> int:
        """Revoke the tokens of users no longer configured: a user added later under the same name
        must not inherit them. Returns how many were revoked."""
        with self._db.begin() as conn:
            rows = conn.execute(sa.select(T.c.id, T.c.user).where(T.c.revoked.is_(None))).all()
            gone = [token_id for token_id, user in rows if user not in users]
            if gone:
                conn.execute(sa.update(T).where(T.c.id.in_(gone)).values(revoked=time.time()))
        for token_id in gone:
            log.warning("API token %s revoked: its user is no longer configured", token_id)
        return len(gone)

    def authenticate(self, token: str) -> TokenIdentity | None:
        """The identity of a valid, unrevoked token (and its last use noted), else None."""
        parsed = parse(token)
        if parsed is None:
            return None
        token_id, secret = parsed
        try:
            with self._db.connect() as conn:
                row = conn.execute(
                    sa.select(T.c.user, T.c.role, T.c.hash, T.c.revoked).where(T.c.id == token_id)
                ).one_or_none()
        except sa.exc.SQLAlchemyError:
            log.exception("API tokens unreadable; refusing the token")
            return None
        if row is None or row.revoked is not None or not hmac.compare_digest(row.hash, _digest(secret)):
            return None
        now = time.time()
        with self._lock:
            due = now - self._last_written.get(token_id, 0.0) >= LAST_USE_EVERY_S
            if due:
                self._last_written[token_id] = now
        if due:
            try:  # best effort: a busy database delays the note of last use, never the request
                with self._db.begin() as conn:
                    conn.execute(sa.update(T).where(T.c.id == token_id).values(last_used=now))
            except sa.exc.SQLAlchemyError as exc:
                log.warning("API token %s: last use not noted (%s)", token_id, exc)
        return TokenIdentity(token_id, str(row.user), str(row.role))

    def close(self) -> None:
        if self._owned:
            self._db.dispose()

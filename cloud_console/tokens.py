"""API tokens: per-user bearer credentials for scripts and CI, kept in the console's SQLite database.

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
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_console.auth import open_table

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


class TokenStore:
    def __init__(self, db: Path) -> None:
        self._db = open_table(
            db,
            "CREATE TABLE IF NOT EXISTS api_tokens (id TEXT PRIMARY KEY, user TEXT NOT NULL,"
            " role TEXT NOT NULL, name TEXT NOT NULL, hash TEXT NOT NULL, created REAL NOT NULL,"
            " last_used REAL, revoked REAL)",
        )
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
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO api_tokens (id, user, role, name, hash, created) VALUES (?, ?, ?, ?, ?, ?)",
                (token_id, user, role, name, _digest(secret), now),
            )
        log.info("API token %s (%s) made for %s, role %s", token_id, name, user, role)
        row = {"id": token_id, "user": user, "role": role, "name": name, "created": now}
        return f"{PREFIX}_{token_id}_{secret}", {**row, "last_used": None, "revoked": None}

    def list(self, user: str | None = None) -> list[dict[str, Any]]:
        """Tokens (never their secrets), newest first; all users' when `user` is None."""
        query = "SELECT id, user, role, name, created, last_used, revoked FROM api_tokens"
        args: tuple[str, ...] = ()
        if user is not None:
            query += " WHERE user = ?"
            args = (user,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created DESC", args).fetchall()
        keys = ("id", "user", "role", "name", "created", "last_used", "revoked")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def owner(self, token_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT user FROM api_tokens WHERE id = ?", (token_id,)).fetchone()
        return str(row[0]) if row else None

    def revoke(self, token_id: str) -> bool:
        """Revoke one token (at once, for every worker sharing the database). False if unknown."""
        with self._lock, self._db:
            done = self._db.execute(
                "UPDATE api_tokens SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), token_id)
            ).rowcount
            known = self._db.execute("SELECT 1 FROM api_tokens WHERE id = ?", (token_id,)).fetchone()
        if done:
            log.info("API token %s revoked", token_id)
        return known is not None

    def revoke_all_but(self, users: set[str]) -> int:
        """Revoke the tokens of users no longer configured: a user added later under the same name
        must not inherit them. Returns how many were revoked."""
        with self._lock, self._db:
            rows = self._db.execute("SELECT id, user FROM api_tokens WHERE revoked IS NULL").fetchall()
            gone = [token_id for token_id, user in rows if user not in users]
            now = time.time()
            self._db.executemany("UPDATE api_tokens SET revoked = ? WHERE id = ?", [(now, t) for t in gone])
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
            with self._lock:
                row = self._db.execute(
                    "SELECT user, role, hash, revoked FROM api_tokens WHERE id = ?", (token_id,)
                ).fetchone()
        except sqlite3.Error:
            log.exception("API tokens unreadable; refusing the token")
            return None
        if row is None or row[3] is not None or not hmac.compare_digest(row[2], _digest(secret)):
            return None
        now = time.time()
        if now - self._last_written.get(token_id, 0.0) >= LAST_USE_EVERY_S:
            self._last_written[token_id] = now
            try:  # best effort: a busy database delays the note of last use, never the request
                with self._lock, self._db:
                    self._db.execute("UPDATE api_tokens SET last_used = ? WHERE id = ?", (now, token_id))
            except sqlite3.Error as exc:
                log.warning("API token %s: last use not noted (%s)", token_id, exc)
        return TokenIdentity(token_id, str(row[0]), str(row[1]))

    def close(self) -> None:
        with self._lock:
            self._db.close()

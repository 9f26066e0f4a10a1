"""Passwords, session cookies and CSRF tokens.

- Passwords: argon2id (argon2-cffi, RFC 9106 low-memory profile: 64 MiB, t=3, p=4), memory-hard, so a
  leaked config is expensive to brute-force. Hashes of earlier versions
  (`scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>`, N=2^14) still verify and are upgraded at the next
  login (`PasswordUpgrades`).
- Sessions: a signed cookie `<payload b64>.<hmac-sha256 b64>` holding user, session id and expiry,
  and a row per session in the console's database (cloud_console/db.py). A cookie is valid while its
  row is there and not revoked, so every console process on one database (sharing `session_secret`,
  or the secret the database keeps when none is configured) accepts it, and a logout on one holds on
  all of them. The role is looked up in the current users on every request (a demoted user loses
  admin at once).
- CSRF: the token is HMAC(secret, "csrf:" + session id): tied to the session, checked on every change.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass

import argon2
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cloud_console import db as schema
from cloud_console.db import upsert

log = logging.getLogger(__name__)

# Old hashes (scrypt, N=2^14) verify with the standard library; new ones are argon2id at the RFC 9106
# "low memory" profile (64 MiB, 3 passes, 4 lanes), above OWASP's minimum (19 MiB, 2 passes).
SCRYPT_DKLEN = 32
_MAXMEM = 256 * 1024 * 1024
ARGON2 = argon2.PasswordHasher.from_parameters(argon2.profiles.RFC_9106_LOW_MEMORY)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    """A salted argon2id hash (`$argon2id$v=19$m=...`) for the `password_hash` of a `[[users]]` entry."""
    return ARGON2.hash(password)


def scrypt_hash(password: str, *, n: int = 2**14, r: int = 8, p: int = 1) -> str:
    """The format of earlier versions (`scrypt$n$r$p$salt$hash`): still verified, upgraded at login."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=SCRYPT_DKLEN)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def needs_upgrade(encoded: str) -> bool:
    """True for a hash below the current parameters (every scrypt hash; a weaker argon2 one)."""
    if not encoded.startswith("$argon2id$"):
        return True
    try:
        return ARGON2.check_needs_rehash(encoded)
    except (ValueError, argon2.exceptions.InvalidHashError):
        return True


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check; a malformed hash is logged and never matches."""
    if encoded.startswith("$argon2"):
        try:
            return ARGON2.verify(encoded, password)
        except argon2.exceptions.VerifyMismatchError:
            return False
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError) as exc:
            log.error("unusable password hash in config (%s)", exc)
            return False
    try:
        scheme, n_text, r_text, p_text, salt_text, hash_text = encoded.split("$")
        if scheme != "scrypt":
            raise ValueError(f"unknown scheme {scheme!r}")
        n, r, p = int(n_text), int(r_text), int(p_text)
        salt, expected = _unb64(salt_text), _unb64(hash_text)
        digest = hashlib.scrypt(
            password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=len(expected)
        )
    except (ValueError, TypeError) as exc:
        log.error(
            "unusable password hash in config (%s); expected $argon2id$... or scrypt$n$r$p$salt$hash", exc
        )
        return False
    return hmac.compare_digest(digest, expected)


class PasswordUpgrades:
    """Stronger hashes of config passwords, made at login, kept in the console's SQLite database.

    The config file stays the source of truth (the operator's file is never rewritten): an upgrade is
    stored against a digest of the config hash it replaces, so a password changed in the config
    makes its upgrade void. Workers sharing the database share the upgrades."""

    def __init__(self, db: Engine | None) -> None:
        self._db = db

    def effective(self, user: str, config_hash: str) -> str:
        """The hash to check a login against: the upgrade of this config hash, else the config's."""
        if self._db is None:
            return config_hash
        t = schema.password_upgrades.c
        try:
            with self._db.connect() as conn:
                found = conn.scalar(
                    sa.select(t.hash).where(t.user == user, t.replaces == password_binding(config_hash))
                )
        except sa.exc.SQLAlchemyError:
            log.exception("password upgrades unreadable; using the config's hash")
            return config_hash
        return str(found) if found else config_hash

    def store(self, user: str, config_hash: str, new_hash: str) -> None:
        if self._db is None:
            return
        row = {"user": user, "replaces": password_binding(config_hash), "hash": new_hash, "ts": time.time()}
        try:
            with self._db.begin() as conn:
                upsert(conn, schema.password_upgrades, [row], ["user"])
        except sa.exc.SQLAlchemyError:
            log.exception("could not store an upgraded password hash (tried again at next login)")

    def login(self, user: str, config_hash: str, password: str) -> bool:
        """Check a password (blocking: argon2/scrypt work); on success upgrade a weak hash."""
        encoded = self.effective(user, config_hash)
        if not verify_password(password, encoded):
            return False
        if needs_upgrade(encoded) and self._db is not None:
            self.store(user, config_hash, hash_password(password))
            log.info("password hash of %s upgraded to argon2id", user)
        return True


@dataclass(frozen=True)
class Session:
    user: str
    sid: str
    expires: float
    key: str = ""  # a digest of the user's password hash at login: a password change ends the session


def password_binding(password_hash: str) -> str:
    """Short digest of a user's stored hash, carried in the cookie (not the hash itself)."""
    return _b64(hashlib.sha256(b"edge-console-binding:" + password_hash.encode()).digest()[:12])


class SessionSigner:
    """Issues and checks signed session cookies and the CSRF tokens bound to them."""

    def __init__(self, secret: bytes, max_age_s: int, db: Engine | None = None) -> None:
        self._key = hashlib.sha256(b"edge-console-session:" + secret).digest()
        self._csrf_key = hashlib.sha256(b"edge-console-csrf:" + secret).digest()
        self.max_age_s = max_age_s
        self._revoked: dict[str, float] = {}  # sid -> expiry, so the set does not grow forever
        self._lock = threading.Lock()
        # Sessions live in the database when there is one (the console always has one): they
        # outlive a restart and every process on the database honours them and their logouts.
        self._db = db

    def _sign(self, data: bytes) -> str:
        return _b64(hmac.new(self._key, data, hashlib.sha256).digest())

    def issue(self, user: str, key: str = "") -> tuple[str, Session]:
        """A new session and its cookie (blocking: one insert)."""
        now = time.time()
        expires = float(int(now + self.max_age_s))  # whole seconds, as the cookie holds it
        session = Session(user=user, sid=secrets.token_urlsafe(16), expires=expires, key=key)
        if self._db is not None:
            t = schema.sessions
            with self._db.begin() as conn:
                conn.execute(sa.delete(t).where(t.c.expires < now))
                conn.execute(
                    sa.insert(t).values(sid=session.sid, user=user, created=now, expires=session.expires)
                )
        payload = json.dumps(
            {"u": session.user, "s": session.sid, "e": int(session.expires), "k": session.key}
        ).encode()
        return f"{_b64(payload)}.{self._sign(payload)}", session

    def read(self, cookie: str | None) -> Session | None:
        """The session of a cookie, or None when missing, forged, expired or logged out."""
        if not cookie or cookie.count(".") != 1:
            return None
        payload_text, signature = cookie.split(".")
        try:
            payload = _unb64(payload_text)
        except ValueError:
            return None
        if not hmac.compare_digest(self._sign(payload), signature):
            return None
        try:
            data = json.loads(payload)
            session = Session(
                user=str(data["u"]), sid=str(data["s"]), expires=float(data["e"]), key=str(data.get("k", ""))
            )
        except (ValueError, KeyError, TypeError):
            return None
        if session.expires < time.time():
            return None
        with self._lock:
            if session.sid in self._revoked:
                return None
        if self._db is not None:
            t = schema.sessions.c
            try:
                with self._db.connect() as conn:
                    row = conn.execute(sa.select(t.user, t.revoked).where(t.sid == session.sid)).one_or_none()
            except sa.exc.SQLAlchemyError:
                log.exception("sessions unreadable; refusing the session")
                return None
            if row is None or row.user != session.user or row.revoked is not None:
                if row is not None:
                    with self._lock:
                        self._revoked[session.sid] = session.expires
                return None
        return session

    def revoke(self, session: Session) -> None:
        """Log out: at once in this process, and in every process on the database."""
        now = time.time()
        with self._lock:
            self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now}
            self._revoked[session.sid] = session.expires
        if self._db is not None:
            t = schema.sessions
            try:
                with self._db.begin() as conn:
                    conn.execute(sa.update(t).where(t.c.sid == session.sid).values(revoked=now))
            except sa.exc.SQLAlchemyError:
                log.exception("could not store a logout (it holds in this process only)")

    def csrf_token(self, session: Session) -> str:
        return _b64(hmac.new(self._csrf_key, b"csrf:" + session.sid.encode(), hashlib.sha256).digest())

    def check_csrf(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(session), token or "")

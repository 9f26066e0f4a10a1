"""Passwords, session cookies and CSRF tokens, with the standard library only.

- Passwords: `scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>` (hashlib.scrypt, 16-byte random salt).
  scrypt is memory-hard, so a leaked config is expensive to brute-force.
- Sessions: a signed cookie `<payload b64>.<hmac-sha256 b64>` holding user, session id and expiry.
  Stateless, so several console workers sharing `session_secret` accept each other's cookies; the
  role is looked up in the current users on every request (a demoted user loses admin at once).
  Logout revokes the session id in this process.
- CSRF: the token is HMAC(secret, "csrf:" + session id): tied to the session, checked on every change.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN = 32
_MAXMEM = 256 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A salted scrypt hash for the `password_hash` of a `[[users]]` entry."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=SCRYPT_DKLEN)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check; a malformed hash is logged and never matches."""
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
        log.error("unusable password hash in config (%s); expected scrypt$n$r$p$salt$hash", exc)
        return False
    return hmac.compare_digest(digest, expected)


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

    def __init__(self, secret: bytes, max_age_s: int, revocations: Path | None = None) -> None:
        self._key = hashlib.sha256(b"edge-console-session:" + secret).digest()
        self._csrf_key = hashlib.sha256(b"edge-console-csrf:" + secret).digest()
        self.max_age_s = max_age_s
        self._revoked: dict[str, float] = {}  # sid -> expiry, so the set does not grow forever
        self._lock = threading.Lock()
        # Logouts are also kept in SQLite (the console's database): they outlive a restart, and
        # workers sharing the database and the secret honour each other's logouts.
        self._db: sqlite3.Connection | None = None
        if revocations is not None:
            revocations.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(revocations, timeout=10.0, check_same_thread=False)
            # Checked on the event loop for every request: never wait long behind the store's writer.
            self._db.execute("PRAGMA busy_timeout=2000")
            with self._db:
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS revoked_sessions"
                    " (sid TEXT PRIMARY KEY, expires REAL NOT NULL)"
                )

    def _sign(self, data: bytes) -> str:
        return _b64(hmac.new(self._key, data, hashlib.sha256).digest())

    def issue(self, user: str, key: str = "") -> tuple[str, Session]:
        expires = float(int(time.time() + self.max_age_s))  # whole seconds, as the cookie holds it
        session = Session(user=user, sid=secrets.token_urlsafe(16), expires=expires, key=key)
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
                try:
                    row = self._db.execute("SELECT 1 FROM revoked_sessions WHERE sid = ?", (session.sid,))
                    if row.fetchone() is not None:
                        self._revoked[session.sid] = session.expires
                        return None
                except sqlite3.Error:
                    log.exception("session revocations unreadable; refusing the session")
                    return None
        return session

    def revoke(self, session: Session) -> None:
        now = time.time()
        with self._lock:
            self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now}
            self._revoked[session.sid] = session.expires
            if self._db is not None:
                try:
                    with self._db:
                        self._db.execute("DELETE FROM revoked_sessions WHERE expires < ?", (now,))
                        self._db.execute(
                            "INSERT OR REPLACE INTO revoked_sessions VALUES (?, ?)",
                            (session.sid, session.expires),
                        )
                except sqlite3.Error:
                    log.exception("could not store a logout (it holds in this process only)")

    def csrf_token(self, session: Session) -> str:
        return _b64(hmac.new(self._csrf_key, b"csrf:" + session.sid.encode(), hashlib.sha256).digest())

    def check_csrf(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(session), token or "")

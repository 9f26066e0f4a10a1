"""API tokens (stored hashed, role-scoped, revocable, last use listed) and password hashes upgraded at
login: the token store on a real SQLite file, the `edge-console token` CLI, and the real console."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import argon2
import pytest

from cloud_console import auth
from cloud_console.tokens import TokenError, TokenStore, effective_role
from tests.test_console import REPO, Client, ConsoleProcess

pytestmark = pytest.mark.timeout(180)


def _dump(database: str) -> str:
    """Every row of every table, as text."""
    import sqlalchemy as sa

    from cloud_console.db import metadata, open_engine

    with open_engine(database).connect() as conn:
        return "\n".join(
            repr(tuple(row)) for t in metadata.sorted_tables for row in conn.execute(sa.select(t))
        )


def test_token_store_keeps_only_a_hash_and_revokes_at_once(database):
    store = TokenStore(database)
    token, row = store.create("ops", "admin", "nightly deploy")
    assert token.startswith(f"ect_{row['id']}_")
    secret = token.split("_", 2)[2]
    dump = _dump(database)
    assert secret not in dump and row["id"] in dump  # the secret itself is never stored
    other_worker = TokenStore(database)  # a second console process on the same database
    identity = other_worker.authenticate(token)
    assert identity is not None and (identity.user, identity.role) == ("ops", "admin")
    assert other_worker.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert other_worker.authenticate("ect_" + row["id"]) is None
    assert store.list("ops")[0]["last_used"] is not None
    assert store.list("someone-else") == []
    assert store.revoke(row["id"]) and not store.revoke("0" * 16)
    assert other_worker.authenticate(token) is None
    with pytest.raises(TokenError):
        store.create("ops", "root", "x")
    with pytest.raises(TokenError):
        store.create("ops", "viewer", " ")
    # A token never grants more than its user's role now (a demoted user's admin token reads only).
    assert effective_role("admin", "viewer") == "viewer"
    assert effective_role("viewer", "admin") == "viewer"
    assert effective_role("admin", "admin") == "admin"
    # A user removed from the config loses their tokens at the next start: someone added later under
    # the same name does not inherit them.
    kept, _ = store.create("ops", "admin", "kept")
    leaver, _ = store.create("bob", "admin", "left with bob")
    assert store.revoke_all_but({"ops", "watcher"}) == 1
    assert store.authenticate(leaver) is None and store.authenticate(kept) is not None


def _users_config(tmp_path, admin_hash: str, viewer_hash: str):
    config = tmp_path / "console.toml"
    config.write_text(
        f'[storage]\ndb = "{tmp_path / "console.db"}"\n'
        f'[[users]]\nname = "ops"\npassword_hash = "{admin_hash}"\nrole = "admin"\n'
        f'[[users]]\nname = "watcher"\npassword_hash = "{viewer_hash}"\nrole = "viewer"\n'
    )
    return config


def test_token_cli_creates_lists_and_revokes(tmp_path):
    old = auth.scrypt_hash("pw-12345678", n=2**10)
    config = _users_config(tmp_path, old, old)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cloud_console", "token", "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )

    made = cli("create", "--user", "watcher", "--name", "grafana")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("ect_") and "shown this once" in made.stderr
    assert cli("create", "--user", "watcher", "--role", "admin", "--name", "x").returncode == 2
    assert cli("create", "--user", "nobody", "--name", "x").returncode == 2
    listing = cli("list")
    assert "grafana" in listing.stdout and "watcher" in listing.stdout and token not in listing.stdout
    token_id = token.split("_")[1]
    assert cli("revoke", token_id).returncode == 0
    assert TokenStore(tmp_path / "console.db").authenticate(token) is None
    assert cli("revoke", "0" * 16).returncode == 1


def test_console_upgrades_old_hashes_and_serves_bearer_tokens(broker, tmp_path):
    # Both users carry hashes in the earlier format (scrypt, N=2^14, as `hash-password` made them).
    old_admin, old_viewer = auth.scrypt_hash("ops-password"), auth.scrypt_hash("watch-password")
    config = _users_config(tmp_path, old_admin, old_viewer)
    console = ConsoleProcess(broker.url, tmp_path, ["--config", str(config)]).start()
    try:
        ops = Client(console.base)
        assert ops.call("POST", "/api/login", {"username": "ops", "password": "wrong"})[0] == 401
        ops.login("ops", "ops-password")
        upgraded = sqlite3.connect(tmp_path / "console.db").execute(
            "SELECT user, hash FROM password_upgrades"
        )
        rows = dict(upgraded.fetchall())
        assert list(rows) == ["ops"], rows  # only the user who logged in, only after a right password
        params = argon2.extract_parameters(rows["ops"])
        assert params.type is argon2.Type.ID and params.memory_cost >= 19 * 1024 and params.time_cost >= 2
        assert config.read_text().count(old_admin) == 1  # the operator's file is not rewritten
        Client(console.base).login("ops", "ops-password")  # the upgraded hash verifies
        assert Client(console.base).call("POST", "/api/login", {"username": "ops", "password": "x"})[0] == 401

        # Tokens from the session: shown once, listed without the secret.
        status, made = ops.call("POST", "/api/tokens", {"name": "ci", "role": "viewer"})
        assert status == 201 and made["role"] == "viewer", made
        status, admin_made = ops.call("POST", "/api/tokens", {"name": "deploys"})
        assert status == 201 and admin_made["role"] == "admin"
        listed = ops.get("/api/tokens")
        assert {t["name"] for t in listed} >= {"ci", "deploys"}
        assert all("token" not in t for t in listed)

        script = Client(console.base)  # curl -H "Authorization: Bearer ..." .../api/devices
        auth_header = {"Authorization": f"Bearer {made['token']}"}
        assert script.call("GET", "/api/devices")[0] == 401
        status, data = script.call("GET", "/api/devices", headers=auth_header)
        assert status == 200 and "devices" in data
        assert script.call("GET", "/api/session", headers=auth_header)[1]["role"] == "viewer"
        # A viewer token cannot change placement; a token cannot make more tokens.
        move = {"model": "m", "from_backend": "a", "to_backend": "b"}
        assert script.call("POST", "/api/fleet/move", move, auth_header)[0] == 403
        admin_header = {"Authorization": f"Bearer {admin_made['token']}"}
        assert script.call("POST", "/api/tokens", {"name": "more"}, admin_header)[0] == 403
        # An admin token changes without a CSRF token (404: no device runs m; it got past the guards).
        assert script.call("POST", "/api/fleet/move", move, admin_header)[0] == 404
        # A session without its CSRF token still cannot change anything.
        ops.csrf = None
        assert ops.call("POST", "/api/fleet/move", move)[0] == 403
        # Behind a proxy with Basic auth the browser sends `Authorization: Basic ...` too: the
        # session cookie still decides (only a bearer token replaces it).
        basic = {"Authorization": "Basic dXNlcjpwYXNz"}
        assert ops.call("GET", "/api/session", headers=basic)[1]["user"] == "ops"
        assert Client(console.base).call("GET", "/api/devices", headers=basic)[0] == 401
        # The viewer sees their own tokens only; the OpenAPI document describes the bearer scheme.
        watcher = Client(console.base).login("watcher", "watch-password")
        assert watcher.get("/api/tokens") == []
        assert watcher.call("DELETE", f"/api/tokens/{made['id']}")[0] == 404
        spec = script.get("/openapi.json")
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert {"get", "post"} <= set(spec["paths"]["/api/tokens"])
        assert {"HTTPBearer": []} in spec["paths"]["/api/devices"]["get"]["security"]
    finally:
        console.stop()

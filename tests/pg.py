"""The tests' private PostgreSQL (bench/local_postgres.py), skipped with the reason where the server
binaries are missing (`make deps` installs Debian's postgresql)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from bench.local_postgres import PostgresServer, server_binaries


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = server_binaries()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (make deps installs Debian's postgresql)")
    with PostgresServer(bin_dir) as server:
        yield server

"""Where rollouts and console-assigned device tags are kept: tables of the console's database
(cloud_console/db.py), SQLite or PostgreSQL alike, so every console process on it sees the same ones.

A rollout is one row holding its record as JSON, written whole on every change, which is what lets
another process (or a restarted one) carry on exactly where it was. Each write names the revision
it read and bumps it (compare and swap): a write that lost a race is refused, not merged, and the
writer reads the row again. Every call blocks; the engine runs them through asyncio.to_thread.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from cloud_console.db import TAGS_VERSION, device_tags, rollouts, settings, tags_changed, upsert

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredRollout:
    id: str
    revision: int
    document: str


class RolloutStore:
    """Rollouts and tags on the console's engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def revisions(self) -> tuple[dict[str, int], str | None]:
        """Every rollout's revision and the tags' version: what changed since the last look,
        without reading records (one round trip a tick on every process)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(rollouts.c.id, rollouts.c.revision)).all()
            tags = conn.scalar(sa.select(settings.c.value).where(settings.c.key == TAGS_VERSION))
        return {row.id: int(row.revision or 0) for row in rows}, tags

    def read(self, ids: list[str] | None = None) -> list[StoredRollout]:
        """The records (all, or those named), oldest first."""
        t = rollouts.c
        query = sa.select(t.id, t.revision, t.document).order_by(t.created)
        if ids is not None:
            query = query.where(t.id.in_(ids))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [StoredRollout(r.id, int(r.revision or 0), r.document) for r in rows]

    def insert(self, rollout_id: str, state: str, created: float, document: str) -> int:
        """A new rollout at revision 1."""
        row = {
            "id": rollout_id,
            "state": state,
            "created": created,
            "updated": time.time(),
            "document": document,
            "revision": 1,
        }
        with self.engine.begin() as conn:
            conn.execute(sa.insert(rollouts).values(row))
        return 1

    def save(self, rollout_id: str, state: str, document: str, revision: int) -> int | None:
        """Replace the record read at `revision`; the new revision, or None when another process
        wrote it meanwhile (nothing is written then)."""
        with self.engine.begin() as conn:
            done = conn.execute(
                sa.update(rollouts)
                .where(rollouts.c.id == rollout_id, rollouts.c.revision == revision)
                .values(state=state, updated=time.time(), document=document, revision=revision + 1)
            ).rowcount
        return revision + 1 if done == 1 else None

    def tags(self) -> dict[str, dict[str, str]]:
        """Console-assigned tags by device id."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(device_tags.c.device_id, device_tags.c.tags)).all()
        found: dict[str, dict[str, str]] = {}
        for row in rows:
            try:
                tags = json.loads(row.tags)
            except (TypeError, ValueError):
                tags = None
            if isinstance(tags, dict):
                found[row.device_id] = {str(k): str(v) for k, v in tags.items()}
            else:
                log.error("device_tags: the tags of %s do not parse; ignored", row.device_id)
        return found

    def set_tags(self, device_id: str, tags: dict[str, str], updated: float) -> None:
        with self.engine.begin() as conn:
            if tags:
                row = {"device_id": device_id, "tags": json.dumps(tags, sort_keys=True), "updated": updated}
                upsert(conn, device_tags, [row], ["device_id"])
            else:
                conn.execute(sa.delete(device_tags).where(device_tags.c.device_id == device_id))
            tags_changed(conn)

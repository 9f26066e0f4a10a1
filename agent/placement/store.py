"""The saved placement (`<state_dir>/placement.json`): what serves, applied again at the next start."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import ValidationError

from agent.protocol.schemas import Placement

log = logging.getLogger(__name__)


class PlacementStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, placement: Placement) -> None:
        """Atomic write, so a crash mid-save leaves the previous placement intact. Blocking."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(placement.model_dump_json(indent=2))
        os.replace(tmp, self.path)

    def load(self) -> Placement | None:
        """The saved placement, or None (none saved, or unreadable: then the config's applies). Blocking."""
        if not self.path.is_file():
            return None
        try:
            return Placement.model_validate_json(self.path.read_text())
        except (OSError, ValidationError) as exc:
            log.warning("ignoring unreadable saved placement %s: %s", self.path, exc)
            return None

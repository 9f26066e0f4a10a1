"""Logging for the agent's commands: journald priorities under systemd, timestamps elsewhere."""

from __future__ import annotations

import logging
import os
import sys
from typing import ClassVar


class JournalFormatter(logging.Formatter):
    """Each line prefixed `<N>` with its syslog priority, which journald reads from a service's
    stderr (SyslogLevelPrefix=, on by default): `journalctl -p err -u edge-agent` then shows the
    errors. Every line of a traceback carries it, so none is filed as info."""

    PRIORITY: ClassVar[dict[int, int]] = {
        logging.CRITICAL: 2,
        logging.ERROR: 3,
        logging.WARNING: 4,
        logging.INFO: 6,
        logging.DEBUG: 7,
    }

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITY.get(record.levelno, 7 if record.levelno < logging.INFO else 3)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def under_journald() -> bool:
    """stderr is the journal's stream (systemd sets JOURNAL_STREAM to its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{stat.st_dev}:{stat.st_ino}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        # journald adds timestamps and the unit name, and reads the priority prefix.
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("aiomqtt").setLevel(max(logging.getLevelName(level), logging.INFO))

"""Log lines carry journald priorities under systemd, so `journalctl -p err` finds the errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from agent.devtools.local_broker import free_port
from agent.service.logs import JournalFormatter


def test_every_line_of_a_record_carries_its_priority():
    formatter = JournalFormatter("%(levelname)s %(name)s: %(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("agent.x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    lines = formatter.format(record).splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), lines
    assert lines[0] == "<3>ERROR agent.x: failed"
    for level, priority in ((logging.WARNING, 4), (logging.INFO, 6), (logging.DEBUG, 7)):
        record = logging.LogRecord("agent.x", level, __file__, 1, "m", None, None)
        assert formatter.format(record).startswith(f"<{priority}>")


def test_the_agent_prefixes_priorities_only_when_stderr_is_the_journal(tmp_path):
    """JOURNAL_STREAM names the journal's stream by device:inode; the agent checks its stderr is it."""
    log = tmp_path / "stderr"
    port = free_port()  # nothing listens: the agent warns that it cannot connect
    args = [
        sys.executable, "-m", "agent", "run", "--broker", f"mqtt://127.0.0.1:{port}",
        "--device-id", "jr1", "--state-dir", str(tmp_path / "state"),
    ]  # fmt: skip

    def run(journal: bool) -> str:
        with log.open("wb") as out:
            st = os.fstat(out.fileno())
            env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}" if journal else "1:1"}
            proc = subprocess.Popen(args, stdout=out, stderr=out, env=env)
            try:
                deadline = time.monotonic() + 60
                while "mqtt connection lost or refused" not in log.read_text():
                    assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                    time.sleep(0.1)
            finally:
                proc.terminate()
                proc.wait(30)
        return log.read_text()

    journal = run(journal=True)
    assert any(line.startswith("<6>INFO agent: edge-agent") for line in journal.splitlines()), journal
    assert any(
        line.startswith("<4>WARNING agent.service.mqtt_session: mqtt connection lost")
        for line in journal.splitlines()
    )
    plain = run(journal=False)
    assert not any(line.startswith("<") for line in plain.splitlines()), plain

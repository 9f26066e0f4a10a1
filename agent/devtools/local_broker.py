"""A private Mosquitto on a free loopback port, for `edge-agent demo`, tests and benchmarks."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class BrokerError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BrokerError(f"nothing listens on {host}:{port} after {timeout_s}s")


class LocalBroker:
    """`with LocalBroker() as broker:` runs mosquitto on 127.0.0.1:<free port>; `restart()` keeps the port."""

    def __init__(
        self,
        port: int | None = None,
        extra_config: str = "",
        workdir: Path | None = None,
        anonymous: bool = True,
        persistence: bool = False,
    ) -> None:
        exe = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
        )
        if exe is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto mosquitto-clients)")
        self.exe = exe
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._tmp = tempfile.TemporaryDirectory(prefix="edge-broker-") if workdir is None else None
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.extra_config = extra_config
        self.anonymous = anonymous
        # Sessions, subscriptions and queued messages saved across a restart (a SIGTERM saves them).
        self.persistence = persistence
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _write_config(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        persistence = "persistence false\n"
        if self.persistence:
            # Mosquitto started as root drops to its own user: it must reach and write this folder.
            store = self.workdir / "persist"
            store.mkdir(exist_ok=True)
            store.chmod(0o777)
            self.workdir.chmod(0o755)
            persistence = f"persistence true\npersistence_location {store}/\nautosave_interval 1\n"
        conf.write_text(
            f"listener {self.port} {self.host}\n"
            f"allow_anonymous {'true' if self.anonymous else 'false'}\n"
            f"{persistence}"
            "max_queued_messages 100000\n"
            "message_size_limit 0\n"
            "set_tcp_nodelay true\n"
            f"{self.extra_config}\n"
        )
        return conf

    def start(self) -> LocalBroker:
        conf = self._write_config()
        log = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.host, self.port)
        except BrokerError:
            self.stop()
            raise BrokerError(f"mosquitto did not start; see {self.workdir / 'mosquitto.log'}") from None
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its password and ACL files."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

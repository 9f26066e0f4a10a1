"""systemd notification protocol (sd_notify) without a dependency: READY=1, WATCHDOG=1, STOPPING=1.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send one datagram to $NOTIFY_SOCKET; True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify %r failed: %s", message, exc)
        return False


def watchdog_interval_s() -> float | None:
    """Half the WatchdogSec systemd asked for, or None when no watchdog is set for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 1e6 / 2)
    except ValueError:
        return None


async def watchdog_loop(interval_s: float) -> None:
    """Ping from the event loop itself: if the loop stalls, the pings stop and systemd restarts us."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)

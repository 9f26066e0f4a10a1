"""Host figures for telemetry, read from /proc and /sys (no extra dependency)."""

from __future__ import annotations

import os
import time
from pathlib import Path


class DeviceStats:
    def __init__(self) -> None:
        self._last_cpu = self._cpu_seconds()
        self._last_wall = time.monotonic()

    @staticmethod
    def _cpu_seconds() -> float:
        t = os.times()
        return t.user + t.system

    def cpu_percent(self) -> float:
        """This process's CPU use since the last call, in % of one core (200% = two cores busy)."""
        cpu, wall = self._cpu_seconds(), time.monotonic()
        used, elapsed = cpu - self._last_cpu, wall - self._last_wall
        self._last_cpu, self._last_wall = cpu, wall
        return round(100.0 * used / elapsed, 1) if elapsed > 0 else 0.0

    @staticmethod
    def rss_mb() -> float:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return 0.0
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 1e6, 1)

    @staticmethod
    def temperature_c() -> float | None:
        """Hottest thermal zone, where the kernel exposes one (Jetson, Raspberry Pi, most laptops)."""
        temps = []
        for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
            try:
                temps.append(int(zone.read_text().strip()) / 1000.0)
            except (OSError, ValueError):
                continue
        return max(temps) if temps else None

    @staticmethod
    def load_1m() -> float | None:
        try:
            return os.getloadavg()[0]
        except OSError:
            return None

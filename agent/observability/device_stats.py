"""Host figures for telemetry and /metrics, read from /proc and /sys; NVIDIA GPUs through nvidia-ml-py
where it is installed and finds one (`pip install 'edge-agent[nvidia]'`).

Reading a figure never resets anything another reader relies on: `cpu_percent()` keeps one window
per caller name (telemetry's own), and /metrics reads the cumulative `cpu_seconds()` instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    utilization_ratio: float  # busy fraction over the driver's last sample period (0..1)
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_c: float | None


class DeviceStats:
    def __init__(self) -> None:
        self._windows: dict[str, tuple[float, float]] = {}
        self._nvml: Any = None
        self._nvml_tried = False

    @staticmethod
    def cpu_seconds() -> float:
        """CPU time this process used since it started (user + system), a counter."""
        t = os.times()
        return t.user + t.system

    def cpu_percent(self, reader: str = "telemetry") -> float:
        """This process's CPU use since `reader`'s last call, in % of one core (200% = two cores).
        Each reader has its own window, so one reader never shortens another's."""
        cpu, wall = self.cpu_seconds(), time.monotonic()
        last_cpu, last_wall = self._windows.get(reader, (cpu, wall))
        self._windows[reader] = (cpu, wall)
        used, elapsed = cpu - last_cpu, wall - last_wall
        return round(100.0 * used / elapsed, 1) if elapsed > 0 else 0.0

    @staticmethod
    def rss_bytes() -> int:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return 0
        return pages * os.sysconf("SC_PAGE_SIZE")

    @classmethod
    def rss_mb(cls) -> float:
        return round(cls.rss_bytes() / 1e6, 1)

    @staticmethod
    def system_memory() -> dict[str, int]:
        """Host memory in bytes: `total` and `available` (what new work can use without swapping)."""
        out: dict[str, int] = {}
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out["total" if key == "MemTotal" else "available"] = int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            return {}
        return out

    @staticmethod
    def disk(path: Path) -> tuple[int, int] | None:
        """(free bytes for this user, total bytes) of the filesystem holding `path`."""
        try:
            usage = shutil.disk_usage(path)
        except OSError:
            return None
        return usage.free, usage.total

    @staticmethod
    def temperatures() -> dict[str, float]:
        """Each thermal zone's temperature in °C, by zone type (cpu-thermal, acpitz, ...)."""
        out: dict[str, float] = {}
        for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
            try:
                value = int((zone / "temp").read_text().strip()) / 1000.0
            except (OSError, ValueError):
                continue
            try:
                kind = (zone / "type").read_text().strip() or zone.name
            except OSError:
                kind = zone.name
            name = kind if kind not in out else f"{kind}-{zone.name}"
            out[name] = value
        return out

    @classmethod
    def temperature_c(cls) -> float | None:
        """Hottest thermal zone, where the kernel exposes one (Jetson, Raspberry Pi, most laptops)."""
        temps = cls.temperatures()
        return max(temps.values()) if temps else None

    @staticmethod
    def load_1m() -> float | None:
        try:
            return os.getloadavg()[0]
        except OSError:
            return None

    def gpus(self) -> list[GpuReading]:
        """NVIDIA GPUs as NVML reports them; [] without nvidia-ml-py, a driver, or a GPU."""
        if not self._nvml_tried:
            self._nvml_tried = True
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception as exc:  # no module, no driver (NVMLError), no GPU
                log.debug("no NVIDIA GPU figures: %s", exc)
        nvml = self._nvml
        if nvml is None:
            return []
        out = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    temp: float | None = float(
                        nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
                    )
                except nvml.NVMLError:
                    temp = None
                out.append(
                    GpuReading(
                        index=index,
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        utilization_ratio=util.gpu / 100.0,
                        memory_used_bytes=int(memory.used),
                        memory_total_bytes=int(memory.total),
                        temperature_c=temp,
                    )
                )
        except nvml.NVMLError as exc:
            log.debug("NVML read failed: %s", exc)
        return out

    def telemetry_extras(self, state_dir: Path) -> dict[str, Any]:
        """The whole device's figures for telemetry's `device` (docs/protocol.md "Telemetry"), in
        its units (MB = 10^6 bytes); a figure that cannot be read is left out."""
        out: dict[str, Any] = {}
        memory = self.system_memory()
        if "total" in memory:
            out["memory_total_mb"] = round(memory["total"] / 1e6, 1)
        if "available" in memory:
            out["memory_available_mb"] = round(memory["available"] / 1e6, 1)
        disk = self.disk(state_dir)
        if disk is not None:
            out["disk_free_mb"] = round(disk[0] / 1e6, 1)
        gpus = self.gpus()
        if gpus:
            out["gpus"] = [
                {
                    "index": g.index,
                    "name": g.name,
                    "utilization": g.utilization_ratio,
                    "memory_used_mb": round(g.memory_used_bytes / 1e6, 1),
                    "memory_total_mb": round(g.memory_total_bytes / 1e6, 1),
                    "temperature_c": g.temperature_c,
                }
                for g in gpus
            ]
        return out

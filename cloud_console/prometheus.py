"""The console's fleet-wide `/metrics`: every device's last telemetry and status, in Prometheus text.

One scrape target for the whole fleet (docs/monitoring.md). Names follow Prometheus conventions
(seconds, bytes, ratios, `_total`). The figures are what devices send as telemetry (every 5 s by
default): counters since each agent started, throughput and latency percentiles over the telemetry
window. For latency histograms that aggregate over devices, scrape the agents' own `/metrics`.
The counters are the telemetry schema's (`TenantCounters`, `DeviceCounters`): one added there is
exported here too, as the agent's own `/metrics` does.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.protocol.schemas import REJECTED_CODES, DeviceCounters, TenantCounters
from cloud_console.fleet import Fleet

TENANT = ["device_id", "model", "backend", "device"]


class FleetCollector(Collector):
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterable[Metric]:
        devices = list(self.fleet.devices.values())
        count = GaugeMetricFamily("edge_fleet_devices", "Devices the console knows.")
        count.add_metric([], len(devices))
        yield count
        up = GaugeMetricFamily(
            "edge_fleet_device_online", "1 while the device's status says online.", labels=["device_id"]
        )
        seen = GaugeMetricFamily(
            "edge_fleet_device_last_seen_timestamp_seconds",
            "When the device last sent anything.",
            labels=["device_id"],
        )
        counters = {
            key: CounterMetricFamily(f"edge_fleet_{key}", field.description or key, labels=TENANT)
            for key, field in TenantCounters.model_fields.items()
        }
        device_counters = {
            key: CounterMetricFamily(f"edge_fleet_{key}", field.description or key, labels=["device_id"])
            for key, field in DeviceCounters.model_fields.items()
        }
        rejected = CounterMetricFamily(
            "edge_fleet_rejected",
            "Frames refused before a tenant, by error code.",
            labels=["device_id", "code"],
        )
        fps = GaugeMetricFamily(
            "edge_fleet_throughput_frames_per_second",
            "Results per second over the telemetry window.",
            labels=TENANT,
        )
        queue = GaugeMetricFamily(
            "edge_fleet_queue_depth", "Frames waiting in the tenant's queue.", labels=TENANT
        )
        latency = {
            q: GaugeMetricFamily(
                f"edge_fleet_latency_{q}_seconds",
                f"{q} of receive-to-result latency over the telemetry window.",
                labels=TENANT,
            )
            for q in ("p50", "p95", "p99")
        }
        host = {
            key: GaugeMetricFamily(f"edge_fleet_{key}", help_, labels=["device_id"])
            for key, help_ in (
                ("process_cpu_ratio", "Agent CPU use (1 = one core busy)."),
                ("process_resident_memory_bytes", "Agent resident memory."),
                ("temperature_celsius", "Hottest thermal zone of the device."),
                ("load1", "1-minute load average of the device."),
                ("system_memory_total_bytes", "Device memory."),
                ("system_memory_available_bytes", "Device memory available without swapping."),
                ("state_dir_free_bytes", "Free space on the agent's state directory."),
            )
        }
        gpu = {
            key: GaugeMetricFamily(f"edge_fleet_gpu_{key}", help_, labels=["device_id", "gpu", "name"])
            for key, help_ in (
                ("utilization_ratio", "GPU busy fraction (NVML)."),
                ("memory_used_bytes", "GPU memory in use (NVML)."),
                ("memory_total_bytes", "GPU memory (NVML)."),
            )
        }
        for d in devices:
            up.add_metric([d.device_id], 1.0 if d.online else 0.0)
            seen.add_metric([d.device_id], d.last_seen)
            t = d.telemetry
            if t is None:
                continue
            for tenant in t.tenants:
                labels = [d.device_id, tenant.model, tenant.backend, tenant.device]
                for key, family in counters.items():
                    family.add_metric(labels, getattr(tenant, key))
                fps.add_metric(labels, tenant.fps)
                queue.add_metric(labels, tenant.queue_depth)
                for q, gauge in latency.items():
                    gauge.add_metric(labels, getattr(tenant.latency_ms, q) / 1000.0)
            for key, family in device_counters.items():
                family.add_metric([d.device_id], getattr(t, key))
            for code in sorted({*REJECTED_CODES, *t.rejected}):  # each documented code from 0
                rejected.add_metric([d.device_id, code], t.rejected.get(code, 0))
            readings = {
                "process_cpu_ratio": t.device.cpu_percent / 100.0,
                "process_resident_memory_bytes": t.device.rss_mb * 1e6,
                "temperature_celsius": t.device.temperature_c,
                "load1": t.device.load_1m,
                "system_memory_total_bytes": _bytes(t.device.memory_total_mb),
                "system_memory_available_bytes": _bytes(t.device.memory_available_mb),
                "state_dir_free_bytes": _bytes(t.device.disk_free_mb),
            }
            for key, value in readings.items():
                if value is not None:
                    host[key].add_metric([d.device_id], value)
            for g in t.device.gpus or []:
                labels = [d.device_id, str(g.index), g.name]
                gpu["utilization_ratio"].add_metric(labels, g.utilization)
                gpu["memory_used_bytes"].add_metric(labels, g.memory_used_mb * 1e6)
                gpu["memory_total_bytes"].add_metric(labels, g.memory_total_mb * 1e6)
        yield from (
            up,
            seen,
            *counters.values(),
            *device_counters.values(),
            rejected,
            fps,
            queue,
            *latency.values(),
            *host.values(),
            *gpu.values(),
        )


def _bytes(mb: float | None) -> float | None:
    return None if mb is None else mb * 1e6


def fleet_registry(fleet: Fleet) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)

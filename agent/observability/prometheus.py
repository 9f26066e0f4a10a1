"""Optional Prometheus `/metrics` endpoint (off by default; `metrics.prometheus_listen`).

Built with `prometheus_client` and its naming rules: base units (seconds, bytes, ratios), counters
ending in `_total`, latency as histograms per tenant and stage (aggregatable over a fleet with
`histogram_quantile(0.95, sum by (le) (rate(...)))`). Each scrape reads the live counters and
cumulative histograms; it resets nothing, so MQTT telemetry's windows are untouched. Throughput is
`rate(edge_agent_frames_out_total[1m])`: counters have no ceiling. The counters are the telemetry
schema's (`TenantCounters`, `DeviceCounters`): one added there is exported here too. Every counter
a dashboard plots has a sample from the first scrape (0), so its line is never empty.
docs/monitoring.md lists every metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import __version__
from agent.protocol.schemas import REJECTED_CODES, DeviceCounters, TenantCounters

if TYPE_CHECKING:
    from agent.observability.reporting import Reporter

log = logging.getLogger(__name__)

TENANT_LABELS = ["device_id", "model", "backend", "device"]


def counter_families(
    schema: type[TenantCounters] | type[DeviceCounters], prefix: str, labels: list[str]
) -> dict[str, CounterMetricFamily]:
    """One counter family per field of a telemetry counters schema, its description as help."""
    return {
        name: CounterMetricFamily(f"{prefix}{name}", field.description or name, labels=labels)
        for name, field in schema.model_fields.items()
    }


class AgentCollector(Collector):
    """Everything the agent knows, read at scrape time from the reporter's sources."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def collect(self) -> Iterable[Metric]:
        r = self.reporter
        device_id = r.config.device_id
        info = GaugeMetricFamily(
            "edge_agent_info", "The agent's version (always 1).", labels=["device_id", "version"]
        )
        info.add_metric([device_id, __version__], 1)
        yield info
        start = GaugeMetricFamily("edge_agent_start_time_seconds", "When the agent started (Unix time).")
        start.add_metric([], r.started_at)
        yield start

        counters = counter_families(TenantCounters, "edge_agent_", TENANT_LABELS)
        latency = HistogramMetricFamily(
            "edge_agent_latency_seconds",
            "Time per frame by stage: queue (arrival to batch start), preprocess (decode and resize, "
            "this frame's share), infer (the batch's runtime call), total (arrival to result).",
            labels=[*TENANT_LABELS, "stage"],
        )
        batch = HistogramMetricFamily(
            "edge_agent_batch_size", "Frames per runtime call.", labels=TENANT_LABELS
        )
        queue = GaugeMetricFamily(
            "edge_agent_queue_depth", "Frames waiting in the tenant's queue.", labels=TENANT_LABELS
        )
        instances = GaugeMetricFamily(
            "edge_agent_instances", "Instances of the tenant.", labels=TENANT_LABELS
        )
        for tenant in r.table.serving():
            labels = [
                device_id,
                tenant.spec.tenant_key(),
                tenant.spec.backend,
                tenant.device,
            ]  # `model`: the key
            for name, value in tenant.stats.counters():
                counters[name].add_metric(labels, value)
            for stage, (buckets, total) in tenant.stats.histograms().items():
                if stage == "batch_size":
                    batch.add_metric(labels, buckets, total)
                else:
                    latency.add_metric([*labels, stage], buckets, total)
            queue.add_metric(labels, len(tenant.queue))
            instances.add_metric(labels, tenant.spec.instances)
        yield from counters.values()
        yield from (latency, batch, queue, instances)

        failovers = CounterMetricFamily(
            "edge_agent_failovers",
            "Moves of a model's tenant between its candidates (failovers and failbacks).",
            labels=["device_id", "model"],
        )
        for model, n in sorted(r.table.failover_counts.items()):
            failovers.add_metric([device_id, model], n)
        yield failovers

        rejected = CounterMetricFamily(
            "edge_agent_rejected",
            "Frames refused before a tenant, by error code.",
            labels=["device_id", "code"],
        )
        counts = dict(r.rejected())
        for code in sorted({*REJECTED_CODES, *counts}):  # each documented code from 0
            rejected.add_metric([device_id, code], counts.get(code, 0))
        yield rejected
        families = counter_families(DeviceCounters, "edge_agent_", ["device_id"])
        for name, value in r.device_counters():
            families[name].add_metric([device_id], value)
        yield from families.values()
        if r.broker_dropped is not None:
            dropped = CounterMetricFamily(
                "edge_agent_broker_dropped",
                "Publishes the broker dropped, all clients ($SYS).",
                labels=["device_id"],
            )
            dropped.add_metric([device_id], r.broker_dropped)
            yield dropped
        yield from self._host(device_id)

    def _host(self, device_id: str) -> Iterable[Metric]:
        stats = self.reporter.device_stats
        memory = stats.system_memory()
        disk = stats.disk(self.reporter.config.state_dir) or (None, None)
        single = [
            ("system_memory_total_bytes", "Host memory.", memory.get("total")),
            (
                "system_memory_available_bytes",
                "Host memory available without swapping.",
                memory.get("available"),
            ),
            ("state_dir_free_bytes", "Free space on the state directory's filesystem.", disk[0]),
            ("state_dir_size_bytes", "Size of the state directory's filesystem.", disk[1]),
            ("load1", "1-minute load average of the host.", stats.load_1m()),
        ]
        for name, help_, reading in single:
            if reading is not None:
                family = GaugeMetricFamily(f"edge_agent_{name}", help_, labels=["device_id"])
                family.add_metric([device_id], reading)
                yield family
        temps = stats.temperatures()
        if temps:
            t = GaugeMetricFamily(
                "edge_agent_temperature_celsius", "Thermal zone temperature.", labels=["device_id", "zone"]
            )
            for zone, value in temps.items():
                t.add_metric([device_id, zone], value)
            yield t
        gpus = stats.gpus()
        fields = {
            "utilization_ratio": "GPU busy fraction (NVML).",
            "memory_used_bytes": "GPU memory in use (NVML).",
            "memory_total_bytes": "GPU memory (NVML).",
            "temperature_celsius": "GPU temperature (NVML).",
        }
        families = {
            key: GaugeMetricFamily(f"edge_agent_gpu_{key}", help_, labels=["device_id", "gpu", "name"])
            for key, help_ in fields.items()
        }
        for gpu in gpus:
            lab = [device_id, str(gpu.index), gpu.name]
            readings = {
                "utilization_ratio": gpu.utilization_ratio,
                "memory_used_bytes": gpu.memory_used_bytes,
                "memory_total_bytes": gpu.memory_total_bytes,
                "temperature_celsius": gpu.temperature_c,
            }
            for key, reading in readings.items():
                if reading is not None:
                    families[key].add_metric(lab, reading)
        if gpus:
            yield from families.values()


def registry_for(reporter: Reporter) -> CollectorRegistry:
    """The agent's metrics plus the standard `process_*` ones (CPU seconds, resident memory, fds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(reporter))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


async def serve(listen: str, reporter: Reporter) -> None:
    host, _, port = listen.rpartition(":")
    registry = registry_for(reporter)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass  # skip headers
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                started = time.perf_counter()
                # Off the loop: host figures ask sysfs and NVML, which a wedged driver can stall.
                body = await asyncio.to_thread(render, registry)
                status, ctype = "200 OK", CONTENT_TYPE_LATEST
                log.debug("scrape rendered in %.1f ms", (time.perf_counter() - started) * 1000)
            else:
                body, status, ctype = b"not found: try /metrics\n", "404 Not Found", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host.strip("[]") or "127.0.0.1", int(port))
    log.info("prometheus metrics on http://%s/metrics", listen)
    async with server:
        await server.serve_forever()

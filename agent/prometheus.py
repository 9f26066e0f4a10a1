"""Optional Prometheus `/metrics` endpoint (off by default): the telemetry figures, scrapeable.

A few lines of asyncio instead of a dependency: GET /metrics answers the text exposition format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from agent.protocol.schemas import Telemetry

log = logging.getLogger(__name__)


def _labels(**labels: str) -> str:
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels.items()
    )
    return "{" + inner + "}"


def render(t: Telemetry) -> str:
    lines = [
        "# HELP edge_agent_frames_in_total Frames routed to a tenant.",
        "# TYPE edge_agent_frames_in_total counter",
        "# HELP edge_agent_frames_out_total Frames answered with a result.",
        "# TYPE edge_agent_frames_out_total counter",
        "# HELP edge_agent_errors_total Frames answered with an error.",
        "# TYPE edge_agent_errors_total counter",
        "# HELP edge_agent_drops_total Frames dropped by the overload policy.",
        "# TYPE edge_agent_drops_total counter",
        "# HELP edge_agent_stalls_total Batches answered because the runtime call hung.",
        "# TYPE edge_agent_stalls_total counter",
        "# HELP edge_agent_throughput_fps Results per second over the telemetry window.",
        "# TYPE edge_agent_throughput_fps gauge",
        "# HELP edge_agent_latency_ms End-to-end latency in the agent (receive to result).",
        "# TYPE edge_agent_latency_ms gauge",
        "# HELP edge_agent_queue_depth Frames waiting in the tenant queue.",
        "# TYPE edge_agent_queue_depth gauge",
        "# HELP edge_agent_batch_size_mean Mean batch size.",
        "# TYPE edge_agent_batch_size_mean gauge",
    ]
    for tenant in t.tenants:
        lab = dict(device_id=t.device_id, model=tenant.model, backend=tenant.backend, device=tenant.device)
        lines.append(f"edge_agent_frames_in_total{_labels(**lab)} {tenant.frames_in}")
        lines.append(f"edge_agent_frames_out_total{_labels(**lab)} {tenant.frames_out}")
        lines.append(f"edge_agent_errors_total{_labels(**lab)} {tenant.errors}")
        lines.append(f"edge_agent_drops_total{_labels(**lab)} {tenant.drops}")
        lines.append(f"edge_agent_stalls_total{_labels(**lab)} {tenant.stalls}")
        lines.append(f"edge_agent_throughput_fps{_labels(**lab)} {tenant.fps:.3f}")
        for q, v in tenant.latency_ms.items():
            lines.append(f"edge_agent_latency_ms{_labels(**lab, quantile=q)} {v:.3f}")
        lines.append(f"edge_agent_queue_depth{_labels(**lab)} {tenant.queue_depth}")
        lines.append(f"edge_agent_batch_size_mean{_labels(**lab)} {tenant.batch_size_mean:.3f}")
    lines += [
        "# HELP edge_agent_rejected_total Frames refused at ingest, by error code.",
        "# TYPE edge_agent_rejected_total counter",
        *(
            f"edge_agent_rejected_total{_labels(device_id=t.device_id, code=c)} {n}"
            for c, n in t.rejected.items()
        ),
        "# HELP edge_agent_duplicates_total Frames not run again: their request id was served or in flight.",
        "# TYPE edge_agent_duplicates_total counter",
        f"edge_agent_duplicates_total{_labels(device_id=t.device_id)} {t.duplicates}",
        *(
            [
                "# HELP edge_agent_broker_dropped_total Publishes the broker dropped, all clients ($SYS).",
                "# TYPE edge_agent_broker_dropped_total counter",
                f"edge_agent_broker_dropped_total{_labels(device_id=t.device_id)} {t.broker_dropped}",
            ]
            if t.broker_dropped is not None
            else []
        ),
        "# TYPE edge_agent_cpu_percent gauge",
        f"edge_agent_cpu_percent{_labels(device_id=t.device_id)} {t.device.cpu_percent}",
        "# TYPE edge_agent_rss_megabytes gauge",
        f"edge_agent_rss_megabytes{_labels(device_id=t.device_id)} {t.device.rss_mb}",
    ]
    if t.device.temperature_c is not None:
        lines += [
            "# TYPE edge_agent_temperature_celsius gauge",
            f"edge_agent_temperature_celsius{_labels(device_id=t.device_id)} {t.device.temperature_c}",
        ]
    return "\n".join(lines) + "\n"


async def serve(listen: str, snapshot: Callable[[], Telemetry]) -> None:
    host, _, port = listen.rpartition(":")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass  # skip headers
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                body, status = render(snapshot()).encode(), "200 OK"
                ctype = "text/plain; version=0.0.4; charset=utf-8"
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

    server = await asyncio.start_server(handle, host or "127.0.0.1", int(port))
    log.info("prometheus metrics on http://%s/metrics", listen)
    async with server:
        await server.serve_forever()

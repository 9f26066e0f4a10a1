"""Take the console screenshots (docs/console.md): `python -m bench.screenshots`.

A private Mosquitto, the console and 40 simulated devices; a few placement actions so the table
shows every state (applied, refused, a tenant moved), then the fleet page (and one device page)
in headless Chromium, written to cloud_console/screenshot-fleet.png (and screenshot-device.png).
"""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.devtools.local_broker import LocalBroker, free_port
from bench.console_load import CHROMIUM, CHROMIUM_ARGS, Http, wait_healthy
from cloud_console.simulator import FleetSimulator

# The screenshots live with the console they show.
HERE = Path(__file__).resolve().parent.parent / "cloud_console"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=40)
    parser.add_argument("--out", type=Path, default=HERE / "screenshot-fleet.png")
    parser.add_argument("--device-out", type=Path, default=HERE / "screenshot-device.png")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    password = secrets.token_urlsafe(12)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        console = subprocess.Popen(
            [
                sys.executable, "-m", "cloud_console", "serve", "--broker", broker.url,
                "--listen", f"127.0.0.1:{port}", "--db", f"{tmp}/console.db",
                "--demo-users", f"admin={password},viewer={password}", "--log-level", "WARNING",
            ]
        )  # fmt: skip
        sim = FleetSimulator(broker.host, broker.port, args.devices, interval_s=1.0, id_prefix="cam")
        try:
            http = Http(base)
            wait_healthy(http, console)
            sim.start()
            http.login("admin", password)
            while http.json("GET", "/api/stats")["online"] < args.devices:
                time.sleep(0.2)
            one = {"model": "efficientnet-lite0", "backend": "openvino", "device": "GPU", "instances": 2}
            http.json("PUT", "/api/devices/cam-0004/placement", {"tenants": [one]})
            http.json("POST", "/api/devices/cam-0008/auto-place")
            http.json(
                "POST",
                "/api/fleet/move",
                {"model": "efficientnet-lite0", "from_backend": "onnxruntime", "to_backend": "tensorrt"},
            )
            time.sleep(6)  # a few telemetry rounds, so throughput and the charts have data
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 860})
                page.goto(base + "/login")
                page.fill("#username", "admin")
                page.fill("#password", password)
                page.click("#login-submit")
                page.wait_for_selector("#fleet-body tr[data-device]")
                time.sleep(2)
                page.screenshot(path=str(args.out))
                page.goto(base + "/devices/cam-0004")
                page.wait_for_selector("#chart-fps canvas")
                time.sleep(4)
                page.screenshot(path=str(args.device_out), full_page=True)
                browser.close()
        finally:
            sim.stop()
            console.terminate()
            console.wait(30)
    print(f"wrote {args.out} and {args.device_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

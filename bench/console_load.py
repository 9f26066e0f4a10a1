"""`python -m bench.console_load`: does the console keep up with a fleet? Prints figures, not a test.

Starts a private Mosquitto, the console (`edge-console serve`, a subprocess as in production) and the
simulator (`edge-console simulate`, another subprocess) with N devices, then for `duration_s`:
samples the console's /api/stats once a second (messages/s handled, backlog = MQTT messages received
but not yet handled, database rows waiting for the writer), and at the end times the fleet page:
HTTP GET of the page and of the fleet API, and in headless Chromium (navigation until the table shows
every device) when Playwright and /usr/bin/chromium are present.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import logging
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent.devtools.local_broker import LocalBroker, free_port

log = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class Http:
    """A tiny cookie-keeping HTTP client (stdlib only) for the console's JSON API."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.csrf = ""

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)  # noqa: S310 (our own URL)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.csrf:
            req.add_header("X-CSRF-Token", self.csrf)
        try:
            with self.opener.open(req, timeout=timeout) as res:
                return res.status, res.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, method: str, path: str, body: Any = None) -> Any:
        status, data = self.request(method, path, body)
        if status >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {status} {data[:200]!r}")
        return json.loads(data)

    def login(self, user: str, password: str) -> None:
        self.csrf = self.json("POST", "/api/login", {"username": user, "password": password})["csrf_token"]


def wait_healthy(http: Http, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the console exited with {proc.returncode}")
        try:
            status, body = http.request("GET", "/healthz", timeout=2.0)
            if status == 200 and json.loads(body)["mqtt_connected"]:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the console did not become healthy")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), to report the console's CPU use."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def timed(fn: Any, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000.0)
    return out


class Chromium:
    """Headless Chromium logged in as admin, with the fleet page open (live events flowing) while the
    console ingests, and a second tab that times fresh loads of the fleet page."""

    def __init__(self, base: str, password: str) -> None:
        from playwright.sync_api import sync_playwright

        self.base = base
        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        self.context = self.browser.new_context()
        self.live = self.context.new_page()
        self.live.goto(base + "/login")
        self.live.fill("#username", "admin")
        self.live.fill("#password", password)
        self.live.click("#login-submit")
        self.live.wait_for_selector("#fleet-body", timeout=60_000)

    def time_fleet_page(self, devices: int, repeat: int = 5) -> list[float]:
        """Milliseconds from navigation start to the table showing every device."""
        tab = self.context.new_page()
        out = []
        for _ in range(repeat):
            started = time.perf_counter()
            tab.goto(self.base + "/")
            # A selector wait: the page's CSP forbids the string evaluation wait_for_function uses.
            # The page shows its first page of rows: 100 (bench.console_page times it at fleet size).
            shown = min(devices, 100)
            tab.locator(f"body[data-rendered='{shown}']").wait_for(state="attached", timeout=60_000)
            out.append((time.perf_counter() - started) * 1000.0)
        tab.close()
        return out

    def close(self) -> None:
        self.browser.close()
        self._pw.stop()


def chromium_unavailable() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"skipped: {CHROMIUM} not found"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "skipped: playwright is not installed"
    return None


def fmt_ms(values: list[float]) -> str:
    return f"median {statistics.median(values):.0f} ms, max {max(values):.0f} ms (n={len(values)})"


def run_loadcheck(
    devices: int = 500, duration_s: float = 30.0, interval_s: float = 1.0, chromium: bool = True
) -> int:
    expected = devices / interval_s
    print(
        f"loadcheck: {devices} simulated devices, telemetry every {interval_s}s"
        f" (~{expected:.0f} msg/s), {duration_s:.0f}s"
    )
    password = secrets.token_urlsafe(12)
    workdir = Path(tempfile.mkdtemp(prefix="edge-console-load-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    with LocalBroker() as broker:
        try:
            console_log = (workdir / "console.log").open("wb")
            console = subprocess.Popen(
                [
                    sys.executable, "-m", "cloud_console", "serve",
                    "--broker", broker.url, "--listen", f"127.0.0.1:{port}",
                    "--db", str(workdir / "console.db"),
                    "--demo-users", f"admin={password},viewer={password}",
                    "--log-level", "WARNING",
                ],
                stdout=console_log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            procs.append(console)
            http = Http(base)
            wait_healthy(http, console)
            http.login("admin", password)
            sim = subprocess.Popen(
                [
                    sys.executable, "-m", "cloud_console", "simulate",
                    "--broker", broker.url, "--devices", str(devices),
                    "--interval", str(interval_s), "--duration", str(duration_s + 120),
                ],
                stdout=(workdir / "sim.log").open("wb"), stderr=subprocess.STDOUT,
            )  # fmt: skip
            procs.append(sim)
            print(
                f"{'t s':>5} {'devices':>8} {'received':>9} {'msg/s':>7} {'backlog':>8}"
                f" {'db rows':>8} {'flush ms':>9}"
            )
            browser: list[float] | str = "skipped (--no-chromium)"
            chrome: Chromium | None = None
            if chromium:
                browser = chromium_unavailable() or ""
                if not browser:
                    chrome = Chromium(base, password)
                    print("(a Chromium tab shows the live fleet page during the run)")
            samples: list[dict[str, Any]] = []
            cpu0, t0 = cpu_seconds(console.pid), time.monotonic()
            while time.monotonic() - t0 < duration_s:
                time.sleep(1.0)
                stats = http.json("GET", "/api/stats")
                stats["t"] = time.monotonic() - t0
                samples.append(stats)
                print(
                    f"{stats['t']:5.0f} {stats['devices']:8d} {stats['received']:9d}"
                    f" {stats['messages_per_s']:7.1f} {stats['backlog']:8d}"
                    f" {stats['db_pending_rows']:8d} {stats['db_last_flush_ms']:9.1f}"
                )
            cpu = (cpu_seconds(console.pid) - cpu0) / (time.monotonic() - t0) * 100.0
            steady = samples[len(samples) // 3 :]  # after the first 10 s window filled
            rates = [s["messages_per_s"] for s in steady]
            backlogs = [s["backlog"] for s in samples]
            html = timed(lambda: http.request("GET", "/"), 10)
            api_sizes = []

            def get_fleet() -> None:
                status, body = http.request("GET", "/api/devices")
                if status != 200:
                    raise RuntimeError(f"GET /api/devices: HTTP {status}")
                api_sizes.append(len(body))

            api = timed(get_fleet, 10)
            if chrome is not None:
                browser = chrome.time_fleet_page(devices)
                chrome.close()
            final = http.json("GET", "/api/stats")
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    print()
    print(f"devices seen by the console: {final['devices']} ({final['online']} online)")
    print(
        f"messages/s handled (10 s window, steady part): median {statistics.median(rates):.0f},"
        f" min {min(rates):.0f} (telemetry published: ~{expected:.0f}/s)"
    )
    print(
        f"backlog (MQTT messages waiting): max {max(backlogs)}, last 5 samples {backlogs[-5:]};"
        f" db rows waiting at end: {final['db_pending_rows']}, rows written {final['db_written_rows']},"
        f" lost {final['db_lost_rows']}; bad messages {final['bad_messages']}"
    )
    print(f"console CPU while ingesting: {cpu:.0f}% of one core")
    print(f"GET / (fleet page HTML): {fmt_ms(html)}")
    page = min(devices, 100)  # the API's default page
    print(f"GET /api/devices ({page} rows of {devices}, {api_sizes[-1] // 1024} KiB): {fmt_ms(api)}")
    if isinstance(browser, str):
        print(f"Chromium fleet page: {browser}")
    else:
        print(f"Chromium fleet page, navigation to the first {page} rows rendered: {fmt_ms(browser)}")
    kept_up = min(rates) >= 0.9 * expected and max(backlogs[-5:]) < max(100, expected)
    fast = statistics.median(api) < 1000 and (isinstance(browser, str) or statistics.median(browser) < 1000)
    print(
        f"verdict: ingest {'kept up' if kept_up else 'FELL BEHIND'};"
        f" fleet page {'under' if fast else 'OVER'} 1 s"
    )
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if kept_up and fast else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.console_load",
        description="private broker + console + N simulated devices: print figures",
    )
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=1.0, help="simulated telemetry interval, seconds")
    parser.add_argument("--no-chromium", action="store_true", help="skip the in-browser page load timing")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_loadcheck(
        devices=args.devices,
        duration_s=args.duration,
        interval_s=args.interval,
        chromium=not args.no_chromium,
    )


if __name__ == "__main__":
    sys.exit(main())

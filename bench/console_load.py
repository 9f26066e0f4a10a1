"""`python -m bench.console_load`: does the console keep up with a fleet? Prints figures, not a test.

Starts a private Mosquitto, the console (`edge-console serve`, a subprocess as in production) and the
simulator (`edge-console simulate`, another subprocess) with N devices, then for `duration_s`:
samples the console's /api/stats once a second (messages/s handled, backlog = MQTT messages received
but not yet handled, database rows waiting for the writer), and at the end times the fleet page:
HTTP GET of the page and of the fleet API, and in headless Chromium (navigation until the table shows
every device) when Playwright and /usr/bin/chromium are present.

`--postgres` measures the console as several processes instead (docs/console.md, "Measured: 10,000
devices on PostgreSQL"): a private PostgreSQL (bench/local_postgres.py), the simulator in this
process publishing telemetry at QoS 1 as agents do, then one console process and then two sharing
the subscription (`--shared-group`), each on a fresh database: messages stored per second (rows in
the database), backlog, CPU per process and of PostgreSQL, and 0 lost (every acknowledged publish
is a row). With `--kill-at S` one of the two processes is killed (SIGKILL) S seconds in: the other
carries on (ingest and logins) and drains the killed one's broker session (what it held unstored,
and what the broker queued for it since).
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


def _pg_cpu_seconds() -> float:
    """CPU of every PostgreSQL process on the machine (the private server's, during a run)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().split(" ", 2)[1] in ("(postgres)",):
                total += cpu_seconds(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return total


class ConsoleProc:
    """One `edge-console serve` of a group sharing a database and the telemetry subscription."""

    def __init__(self, name: str, broker_url: str, config: Path, workdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.http = Http(f"http://127.0.0.1:{self.port}")
        self.args = [
            sys.executable, "-m", "cloud_console", "serve", "--broker", broker_url,
            "--listen", f"127.0.0.1:{self.port}", "--config", str(config),
            "--shared-group", "console", "--log-level", "WARNING",
        ]  # fmt: skip
        self.log = workdir / f"console-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cpu0 = 0.0

    def start(self) -> ConsoleProc:
        self.proc = subprocess.Popen(self.args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_healthy(self.http, self.proc, timeout_s=120)
        self.http.login("admin", "bench-password")
        self.cpu0 = cpu_seconds(self.proc.pid)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.alive() and self.proc is not None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _cluster_phase(
    processes: int, broker: LocalBroker, server: Any, devices: int, interval_s: float, duration_s: float,
    kill_at: float | None, workdir: Path,
) -> dict[str, Any]:  # fmt: skip
    import sqlalchemy as sa

    from cloud_console.auth import hash_password
    from cloud_console.db import open_engine
    from cloud_console.simulator import FleetSimulator

    database = server.fresh_database()
    config = workdir / f"console-{processes}.toml"
    config.write_text(
        "shared_group_timeout_s = 10\n"
        f'[storage]\ndatabase = "{database}"\n'
        f'[[users]]\nname = "admin"\npassword_hash = "{hash_password("bench-password")}"\nrole = "admin"\n'
    )
    consoles = [
        ConsoleProc(f"{processes}{chr(97 + i)}", broker.url, config, workdir) for i in range(processes)
    ]
    engine = open_engine(database)

    def stored() -> int:
        with engine.connect() as conn:
            return int(conn.scalar(sa.text("SELECT count(*) FROM host_metrics")) or 0)

    sim = FleetSimulator(
        broker.host, broker.port, devices, interval_s=interval_s, id_prefix="pg", telemetry_qos=1
    )
    killed: ConsoleProc | None = None
    out: dict[str, Any] = {"processes": processes}
    try:
        for console in consoles:
            console.start()
        sim.start()
        # Warm-up: every process first reads the whole fleet's retained status (10,000 messages of
        # 1.3 KB each) and telemetry waits behind it; measure from the first moment no backlog is left.
        warm = time.monotonic()
        while time.monotonic() - warm < 180:
            time.sleep(1.0)
            stats = [c.http.json("GET", "/api/stats") for c in consoles]
            flowing = devices / (2 * len(consoles))  # telemetry handled past the status burst
            if all(st["by_kind"]["telemetry"] >= flowing and st["backlog"] < 500 for st in stats):
                break
        out["warmup_s"] = time.monotonic() - warm
        for console in consoles:  # CPU over the measured part only
            console.cpu0 = cpu_seconds(console.proc.pid) if console.proc else 0.0
        print(
            f"\n{processes} process(es) on PostgreSQL, {devices} devices every {interval_s:g} s"
            f" (measured after a {out['warmup_s']:.0f} s warm-up)"
        )
        print(
            f"{'t s':>5} {'stored/s':>9} "
            + " ".join(f"{c.name + ' backlog':>11} {c.name + ' db rows':>11}" for c in consoles)
        )
        t0 = time.monotonic()
        pg0, last_count, last_t = _pg_cpu_seconds(), stored(), t0
        rates: list[float] = []
        backlogs: list[int] = []
        logins_after_kill = 0
        while time.monotonic() - t0 < duration_s:
            time.sleep(1.0)
            now = time.monotonic()
            if kill_at is not None and killed is None and now - t0 >= kill_at:
                killed = consoles[0]
                out["cpu_killed_before"] = (cpu_seconds(killed.proc.pid) - killed.cpu0) / (now - t0) * 100.0  # type: ignore[union-attr]
                killed.stop(signal.SIGKILL)
                print(f"{now - t0:5.0f} killed {killed.name} (SIGKILL)")
            count = stored()
            rate = (count - last_count) / (now - last_t)
            last_count, last_t = count, now
            rates.append(rate)
            cells = []
            for console in consoles:
                if not console.alive():
                    cells.append(f"{'-':>11} {'-':>11}")
                    continue
                stats = console.http.json("GET", "/api/stats")
                backlogs.append(stats["backlog"])
                cells.append(f"{stats['backlog']:11d} {stats['db_pending_rows']:11d}")
                if killed is not None:  # a new login (the stats above used the session made before)
                    Http(console.http.base).login("admin", "bench-password")
                    logins_after_kill += 1
            print(f"{now - t0:5.0f} {rate:9.0f} " + " ".join(cells))
        elapsed = time.monotonic() - t0
        out["cpu"] = {
            c.name: (cpu_seconds(c.proc.pid) - c.cpu0) / elapsed * 100.0
            for c in consoles
            if c.alive() and c.proc
        }
        out["cpu_postgres"] = (_pg_cpu_seconds() - pg0) / elapsed * 100.0
        out["rates"] = rates
        out["backlog_max"] = max(backlogs) if backlogs else 0
        out["logins_after_kill"] = logins_after_kill
        sim.stop()  # waits until the broker acknowledged every telemetry publish
        sent = sim.telemetry_sent
        drained = time.monotonic()
        last, progress = stored(), time.monotonic()
        while last < sent and time.monotonic() - progress < 30.0:  # until no progress for 30 s
            time.sleep(0.5)
            now_count = stored()
            if now_count > last:
                last, progress = now_count, time.monotonic()
        out["drain_s"] = time.monotonic() - drained
        out["sent"], out["stored"] = sent, stored()
        out["lost"] = sent - out["stored"]
    finally:
        sim.stop()
        for console in consoles:
            console.stop()
        engine.dispose()
    return out


def run_cluster(devices: int, duration_s: float, interval_s: float, kill_at: float | None) -> int:
    from bench.local_postgres import PostgresServer, server_binaries

    bin_dir = server_binaries()
    if bin_dir is None:
        print("no PostgreSQL server binaries: make deps installs Debian's postgresql", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="edge-console-pg-"))
    results = []
    with LocalBroker() as broker, PostgresServer(bin_dir) as server:
        for processes, kill in ((1, None), (2, kill_at)):
            results.append(
                _cluster_phase(processes, broker, server, devices, interval_s, duration_s, kill, workdir)
            )
    print()
    ok = True
    for r in results:
        steady = r["rates"][len(r["rates"]) // 3 :]
        cpu = ", ".join(f"{name} {value:.0f}%" for name, value in r["cpu"].items())
        print(
            f"{r['processes']} process(es): stored/s median {statistics.median(steady):.0f}"
            f" (min {min(steady):.0f}, published ~{devices / interval_s:.0f}/s);"
            f" backlog max {r['backlog_max']}; CPU {cpu}, PostgreSQL {r['cpu_postgres']:.0f}% of one core"
        )
        if r["logins_after_kill"]:
            print(
                f"  killed one mid-run: the other served {r['logins_after_kill']} new logins after the kill"
                f" and drained the killed one's session; all stored {r['drain_s']:.1f} s after the"
                " simulator stopped"
            )
        print(
            f"  telemetry acknowledged by the broker {r['sent']}, rows stored {r['stored']}, lost {r['lost']}"
        )
        ok = ok and r["lost"] == 0
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


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
    parser.add_argument(
        "--postgres", action="store_true", help="one, then two console processes on a private PostgreSQL"
    )
    parser.add_argument("--kill-at", type=float, help="with --postgres: kill one of the two after S seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.postgres:
        return run_cluster(args.devices, args.duration, args.interval, args.kill_at)
    return run_loadcheck(
        devices=args.devices,
        duration_s=args.duration,
        interval_s=args.interval,
        chromium=not args.no_chromium,
    )


if __name__ == "__main__":
    sys.exit(main())

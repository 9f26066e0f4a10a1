"""Device pools (docs/pools.md) end to end: one real Mosquitto, two real agents serving the real
efficientnet-lite0 in pool `driveway` and the real console, shared by the tests of this module
(started once); the pools page in real headless Chromium."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest

from agent.commands import cli
from agent.commands.client import InferClient, Reply
from agent.devtools.local_broker import LocalBroker
from tests.conftest import CAT_CLASSES, REPO, SAMPLES, AgentProcess, Collector, sample
from tests.test_console import ConsoleProcess, wait_until
from tests.test_console_browser import CHROMIUM, browser, expect, log_in  # noqa: F401

pytestmark = pytest.mark.timeout(300)

POOL, MODEL = "driveway", "efficientnet-lite0"
MEMBERS = f"edge/pool/{POOL}/members"
RESULTS = f"edge/pool/{POOL}/result"
# Member b has a short queue and every runtime call 60 ms slower (injected): it is the one that fills
# up in the back-pressure test, however fast this machine serves.
CONFIG = """
faults = "{faults}"
[scheduler]
queue_depth = {depth}
[placement]
generation = 1
[[placement.tenants]]
model = "efficientnet-lite0"
threads = 1
pool = "driveway"
latency_objective_ms = 5000
"""


def run_async(coro: Any) -> Any:
    """asyncio.run on a thread of its own: Playwright's sync API keeps a loop on this one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class Pool:
    def __init__(
        self, broker: LocalBroker, a: AgentProcess, b: AgentProcess, watch: Collector, console: ConsoleProcess
    ) -> None:
        self.broker, self.a, self.b, self.watch, self.console = broker, a, b, watch, console

    def members(self) -> dict[str, dict[str, Any]]:
        """The newest announcement of each member."""
        return {m["device_id"]: m for m in self.watch.json(MEMBERS)}

    def wait_open(self, *devices: str) -> None:
        def all_open(msgs: list[dict[str, Any]]) -> bool:
            last = {m["device_id"]: m for m in msgs}
            return all(d in last and last[d]["open"] and not last[d]["busy"] for d in devices)

        self.watch.wait_for(all_open, MEMBERS, timeout=60)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with LocalBroker() as broker:
        agents = []
        for device, depth, faults in (("member-a", 100, ""), ("member-b", 12, "onnxruntime:cpu:slow:ms=60")):
            state = tmp_path_factory.mktemp(device)
            agent = AgentProcess(broker, state, device, CONFIG.format(depth=depth, faults=faults)).start()
            AgentProcess.running.discard(agent)  # lives for the module, not one test
            agents.append(agent)
        watch = Collector(broker.port, [MEMBERS, RESULTS])
        console = ConsoleProcess(broker.url, tmp_path_factory.mktemp("console")).start()
        try:
            for agent in agents:
                agent.wait_ready()
            p = Pool(broker, agents[0], agents[1], watch, console)
            p.wait_open("member-a", "member-b")
            yield p
        finally:
            console.stop()
            watch.close()
            for agent in agents:
                agent.stop(signal.SIGKILL, timeout=10)


def make_video(path: Path) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 10.0, (320, 240))
    frame = cv2.resize(cv2.imread(str(SAMPLES / "cat.jpg")), (320, 240))
    for _ in range(20):
        writer.write(frame)
    writer.release()
    return path


def test_a_camera_sends_to_the_pool_and_both_members_answer(pool: Pool, tmp_path: Path) -> None:
    """`edge-agent camera --pool`: every frame answered once with its request id, by either member;
    the answers name the pool and the member, and go to the pool's result topic too."""
    video = make_video(tmp_path / "cat.mp4")
    args = ["--broker", pool.broker.url, "--pool", POOL, "--model", MODEL, "--frames", "20", "--json"]
    run = subprocess.run(
        [sys.executable, "-m", "agent", "camera", str(video), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    answers = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(answers) == 20
    assert all(a["top"][0]["index"] in CAT_CLASSES and a["pool"] == POOL for a in answers), answers[0]
    assert {a["served_by"] for a in answers} == {"member-a", "member-b"}  # the broker spread them
    ids = {a["request_id"] for a in answers}
    pooled = pool.watch.wait_for(lambda r: ids <= {m["request_id"] for m in r}, RESULTS)
    assert sum(m["request_id"] in ids for m in pooled) == 20, "each answered once on the pool's topic"


def test_pool_needs_a_model_and_a_valid_name(pool: Pool, capsys: pytest.CaptureFixture[str]) -> None:
    for extra in (["--pool", POOL], ["--pool", "Bad/Name", "--model", MODEL]):
        assert cli.main(["infer", "--broker", pool.broker.url, *extra, "x.jpg"]) == 2
        assert "--pool" in capsys.readouterr().err


async def _send_same(pool: Pool, request_id: str, times: int) -> list[Reply]:
    async with InferClient(pool.broker.url, "unused", pool=POOL) as client:
        replies = []
        for _ in range(times):
            fut = await client.send(sample("cat.jpg"), MODEL, request_id)
            replies.append(await asyncio.wait_for(fut, 30))
        return replies


def test_a_repeat_reaching_the_other_member_gets_the_first_answer(pool: Pool) -> None:
    """A frame sent again with its request id (a camera's retry) goes to the other member by round
    robin: that member answers with the first member's answer, learned from the pool's result topic,
    instead of running it again (docs/pools.md, "Exactly once")."""
    replies = run_async(_send_same(pool, "repeat-1", 3))
    first = replies[0].payload
    assert first["served_by"] in ("member-a", "member-b") and "top" in first
    assert [r.payload for r in replies[1:]] == [first, first], "served once, answered three times"


async def _burst(pool: Pool, frames: int, gap_s: float) -> list[Reply]:
    async with InferClient(pool.broker.url, "unused", pool=POOL) as client:
        futures = []
        for i in range(frames):
            futures.append(await client.send(sample("cat.jpg"), MODEL, f"burst-{i}"))
            await asyncio.sleep(gap_s)
        return list(await asyncio.gather(*(asyncio.wait_for(f, 60) for f in futures)))


def test_a_full_member_leaves_the_share_instead_of_answering_overloaded(pool: Pool) -> None:
    """Frames faster than one member serves: member-b (a 12-frame queue) leaves the share when nearly
    full and rejoins once drained, while member-a has room; no frame is answered `overloaded`."""
    pool.wait_open("member-a", "member-b")
    replies = run_async(_burst(pool, 60, 0.003))
    errors = [r.payload["error"] for r in replies if "error" in r.payload]
    assert errors == [], errors[:3]
    pool.wait_open("member-a", "member-b")  # member-b came back
    assert pool.members()["member-b"]["left"] >= 1, pool.members()


def test_the_pools_page_shows_members_their_share_and_the_pool_throughput(pool: Pool, browser) -> None:  # noqa: F811
    """The console hears the members' announcements: the pools page lists both members with their
    share of the frames just sent and the pool's frames per second."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    try:
        log_in(page, pool.console, "admin", pool.console.admin_password)
        page.click("#pools-link")
        run_async(_burst(pool, 20, 0.02))  # with the page open: its figures are the last 10 s
        section = page.locator(f'section.pool[data-pool="{POOL}"]')
        for device in ("member-a", "member-b"):
            expect(section.locator(f'tr[data-device="{device}"] .share')).to_have_text(re.compile(r"^\d+%$"))
        expect(section.locator(".pool-fps")).not_to_have_text("0")
        # Objective attainment comes from the members' telemetry (every 5 s): the burst's frames.
        for device in ("member-a", "member-b"):
            expect(section.locator(f'tr[data-device="{device}"] .objective')).to_have_text("100.0%")
    finally:
        context.close()
    assert problems == [], problems


def _members(client: Any) -> list[str]:
    pools = client.get("/api/pools")
    return [m["device_id"] for p in pools if p["pool"] == POOL for m in p["members"]]


def test_the_console_removes_a_spare_member_and_adds_one_when_the_pool_falls_short(pool: Pool) -> None:
    """Automatic scaling through the placement path: with capacity to spare (one member's capacity
    measured while busy, in the back-pressure test) a member is taken out of the pool; with
    min_members 2 the pool is short, and the console puts the device back (make-before-break)."""
    admin = pool.console.client("admin")
    quick = {"model": MODEL, "auto": True, "up_after_s": 0, "down_after_s": 0, "cooldown_s": 0}
    status, body = admin.call("PUT", f"/api/pools/{POOL}/target", {**quick, "min_members": 1})
    assert status == 200, body
    wait_until(lambda: len(_members(admin)) == 1, "the console to take a member out", timeout=90)
    removed = next(a for a in admin.get("/api/pools")[0]["actions"] if a["action"] == "removed")
    assert removed["device_id"] not in _members(admin)
    status, body = admin.call("PUT", f"/api/pools/{POOL}/target", {**quick, "min_members": 2})
    assert status == 200, body
    wait_until(lambda: len(_members(admin)) == 2, "the console to add a member", timeout=90)
    actions = [(a["action"], a["device_id"]) for a in admin.get("/api/pools")[0]["actions"]]
    assert actions[-1] == ("added", removed["device_id"]), actions
    status, body = admin.call("PUT", f"/api/pools/{POOL}/target", {**quick, "min_members": 2, "auto": False})
    assert status == 200, body
    pool.wait_open("member-a", "member-b")


async def _stream(pool: Pool, frames: int, fps: float, kill_at: int) -> list[Reply]:
    """Frames at `fps`, each retried (same id) after 2 s without an answer; member-b is killed
    with SIGKILL after `kill_at` frames."""
    async with InferClient(pool.broker.url, "unused", pool=POOL) as client:
        tasks = []
        for i in range(frames):
            if i == kill_at:
                assert pool.b.proc is not None
                pool.b.proc.send_signal(signal.SIGKILL)
            tasks.append(
                asyncio.create_task(client.infer(sample("cat.jpg"), MODEL, timeout_s=2.0, retries=2))
            )
            await asyncio.sleep(1.0 / fps)
        return list(await asyncio.gather(*tasks))


def test_a_member_killed_mid_stream_loses_no_frame(pool: Pool) -> None:
    """SIGKILL of a member at 30 fps: the broker stops handing it frames at once (its pool connection
    has no session), and the frames it held are sent again by the camera and served by the other.
    (Last in this module: member-b stays dead.)"""
    pool.wait_open("member-a", "member-b")
    replies = run_async(_stream(pool, 60, 30.0, kill_at=20))
    assert all("top" in r.payload for r in replies), [r.payload for r in replies if "top" not in r.payload]
    late = [r.payload["served_by"] for r in replies[40:]]
    assert set(late) == {"member-a"}, late

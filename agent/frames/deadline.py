"""Calls into a runtime that may never return (a wedged accelerator or driver), under a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def call_with_deadline(fn: Callable[[], T], timeout_s: float, on_late: Callable[[T], None] | None) -> T:
    """Run blocking `fn` on a daemon thread of its own and wait at most `timeout_s` (TimeoutError).

    For calls into a runtime that may hang (a model load on a wedged accelerator): the placement
    then goes on without it, and the process can still exit (asyncio.to_thread's executor threads
    are joined at exit). If `fn` completes after the deadline, `on_late` gets its result to release.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    lock = threading.Lock()
    flags = {"abandoned": False, "finished": False}

    def settle(value: Any, error: BaseException | None) -> None:
        if not future.done():
            future.set_result(value) if error is None else future.set_exception(error)

    def release(value: Any) -> None:
        if on_late is not None:
            with contextlib.suppress(Exception):
                on_late(value)

    def run() -> None:
        value: Any = None
        error: BaseException | None = None
        try:
            value = fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
        with lock:
            flags["finished"] = True
            late = flags["abandoned"]
        if late:
            if error is None:
                release(value)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name="runtime-call", daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout_s)
    except (TimeoutError, asyncio.CancelledError):  # cancelled: the agent is stopping
        with lock:
            flags["abandoned"] = True
            finished = flags["finished"]
        if finished:  # it completed just now, its result already on the way: release it there
            future.add_done_callback(lambda f: release(f.result()) if f.exception() is None else None)
        raise

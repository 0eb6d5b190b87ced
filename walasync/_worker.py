"""A dedicated thread that runs blocking calls in order and reports back to the event loop.

The shape is aiosqlite's: a queue of (future, call) pairs, results posted back with
`call_soon_threadsafe`, a future resolved only if nobody cancelled it. One thread keeps
writes and fdatasyncs in submission order, which group commit relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ("Worker",)

T = TypeVar("T")

_Item = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _resolve(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _reject(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class Worker:
    """One thread, one queue; `run` awaits a blocking call made on that thread."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._last: Callable[[], object] | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue `fn(*args)` on the thread; the returned future gets its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, fut, fn, args))
        return fut

    def stop(self, last: Callable[[], object] | None = None) -> None:
        """Let the thread finish what is queued, run `last` (errors ignored), then exit."""
        self._last = last
        self._queue.put(None)

    def _main(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, fut, fn, args = item
            try:
                result = fn(*args)
            except BaseException as exc:
                self._post(loop, _reject, fut, exc)
            else:
                self._post(loop, _resolve, fut, result)
        if self._last is not None:
            with contextlib.suppress(Exception):
                self._last()

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, cb: Callable[..., None], *args: Any) -> None:
        try:
            loop.call_soon_threadsafe(cb, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

"""A dedicated thread that runs blocking calls in order and reports back to the event loop.

The shape is aiosqlite's: a queue of calls, each result posted back with
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

__all__ = ("Callback", "Worker")

T = TypeVar("T")
Callback = Callable[[Any, "BaseException | None"], None]
_Item = tuple[asyncio.AbstractEventLoop, Callback, Callable[..., Any], tuple[Any, ...]]


def _settle(fut: asyncio.Future[Any]) -> Callback:
    """A callback that hands a result or an exception to `fut`, unless it is cancelled."""

    def settle(result: Any, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)

    return settle


class Worker:
    """One thread, one queue of calls, run in order."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._last: Callable[[], object] | None = None
        self._io_thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._io_thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue `fn(*args)`; the returned future gets its result or exception."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, _settle(fut), fn, args))
        return fut

    def submit(
        self,
        loop: asyncio.AbstractEventLoop,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        callback: Callback,
    ) -> None:
        """Queue `fn(*args)`; then `callback(result, exception)` runs on `loop`.

        Cheaper than `run` on the hot path: no future and no task wake-up in between.
        """
        self._queue.put((loop, callback, fn, args))

    def stop(self, last: Callable[[], object] | None = None) -> None:
        """Let the thread finish what is queued, run `last` (errors ignored), then exit."""
        self._last = last
        self._queue.put(None)

    def _main(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, callback, fn, args = item
            try:
                result = fn(*args)
            except BaseException as exc:
                self._post(loop, callback, None, exc)
            else:
                self._post(loop, callback, result, None)
        if self._last is not None:
            with contextlib.suppress(Exception):
                self._last()

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, callback: Callback, *args: Any) -> None:
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

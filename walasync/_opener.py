"""How a log is opened and who may use it: the opener that `walasync.open` returns (await it,
or use it as `async with`), and the check that a call comes from the log's own event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, Protocol, TypeVar

from .errors import WrongLoopError

__all__ = ("Opener", "require_loop")


class _Closable(Protocol):
    async def close(self) -> None: ...


L = TypeVar("L", bound=_Closable)


class Opener(Generic[L]):
    """Await it for the log, or use it as `async with` (closing the log on exit)."""

    def __init__(self, open_log: Callable[[], Awaitable[L]]) -> None:
        self._open = open_log
        self._log: L | None = None

    def __await__(self) -> Generator[Any, None, L]:
        return self._run().__await__()

    async def _run(self) -> L:
        return await self._open()

    async def __aenter__(self) -> L:
        self._log = await self._open()
        return self._log

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._log is not None
        await self._log.close()


def require_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Raise `WrongLoopError` unless called from `loop`, the one that opened the log."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not loop:
        raise WrongLoopError("a log must be used from the event loop (and thread) that opened it")

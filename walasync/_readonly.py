"""`ReadOnlyWal`: a log opened for reading while another process may be writing it.

It takes no lock and never writes: no repair, no truncation, no spare. What it knows of the
log comes from looking at the files (`Store.refresh`): META, the segment list, and the
batches written since it last looked, read incrementally. A torn or half-written tail is
simply where the data ends for now. The writer may rotate, truncate and cut the log under
it: a vanished segment or a cut is reported as `TruncatedError` (after a fresh look at
META), never read as garbage (checksums and per-segment salts see to that).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from types import TracebackType

from ._io import FileIO
from ._opener import Opener, require_loop
from ._reader import Record, read_records
from ._store import Store
from .errors import ClosedError, TruncatedError, WalError, map_os_error

__all__ = ("ReadOnlyWal", "open_readonly")


class ReadOnlyWal:
    """A log opened with `walasync.open(path, readonly=True)`: reads, never writes.

    `last_lsn` is the end of the valid data as of the last look (at open, at each `read`,
    `refresh` and, with `follow=True`, every `poll_interval` seconds).
    """

    def __init__(self, store: Store, next_lsn: int, poll_interval: float) -> None:
        self._store = store
        self._loop = asyncio.get_running_loop()
        self._next = next_lsn
        self._poll = poll_interval
        self._closed = False
        self._stopped = asyncio.Event()  # set at close: followers stop waiting

    @property
    def path(self) -> str:
        return self._store.path

    @property
    def first_lsn(self) -> int:
        """The oldest LSN that can be read (as of the last look)."""
        return self._store.meta.first_lsn

    @property
    def last_lsn(self) -> int:
        """The LSN of the last valid record (as of the last look); first_lsn - 1 if none."""
        return self._next - 1

    @property
    def closed(self) -> bool:
        return self._closed

    def _check(self) -> None:
        require_loop(self._loop)
        if self._closed:
            raise ClosedError("the log is closed")

    async def refresh(self) -> int:
        """Look at the files again; return the new `last_lsn`.

        Raises:
            CorruptionError: the directory no longer holds a log, or META is damaged.
            WalError: the files could not be read.
        """
        self._check()
        try:
            self._next = await self._loop.run_in_executor(None, self._store.refresh)
        except OSError as exc:
            raise map_os_error(exc, f"reading {self.path}") from exc
        return self.last_lsn

    def read(
        self, start: int | None = None, end: int | None = None, *, follow: bool = False
    ) -> AsyncGenerator[Record, None]:
        """Iterate over records from `start` (default: `first_lsn`) to `end`.

        Without `follow`, up to `last_lsn` after a fresh look at the files. With `follow`,
        it then looks again every `poll_interval` seconds and yields new records as they
        appear, until `end` (if given) or until this log is closed.

        Raises:
            ValueError: `start` is below 1.
            TruncatedError: the records asked for were removed, before or during the read.
            CorruptionError, WalError: as for `Wal.read`.
        """
        self._check()
        if start is not None and start < 1:
            raise ValueError(f"start must be >= 1, not {start}")
        return self._read(start, end, follow)

    async def _read(
        self, start: int | None, end: int | None, follow: bool
    ) -> AsyncGenerator[Record, None]:
        await self.refresh()
        lsn = self.first_lsn if start is None else start
        if lsn < self.first_lsn:
            raise TruncatedError(f"records below {self.first_lsn} were truncated")
        while True:
            stop = self.last_lsn if end is None else min(end, self.last_lsn)
            if lsn <= stop:
                store = self._store
                async for rec in read_records(store, store.snapshot(), lsn, stop):
                    yield rec
                    lsn = rec.lsn + 1
            if not follow or (end is not None and lsn > end) or self._closed:
                return
            waiter = asyncio.ensure_future(self._stopped.wait())
            try:
                await asyncio.wait([waiter], timeout=self._poll)
            finally:
                waiter.cancel()
            if self._closed:
                return
            await self.refresh()

    async def close(self) -> None:
        """Stop followers (they finish their iteration); idempotent."""
        self._closed = True
        self._stopped.set()

    async def __aenter__(self) -> ReadOnlyWal:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<ReadOnlyWal {self.path!r} {state} first_lsn={self.first_lsn} "
            f"last_lsn={self.last_lsn}>"
        )


async def _open_readonly(
    path: str, io: FileIO, poll_interval: float, max_record_size: int
) -> ReadOnlyWal:
    loop = asyncio.get_running_loop()
    try:
        store = await loop.run_in_executor(None, Store.open_readonly, io, path)
        store.max_record_size = max_record_size
        next_lsn = await loop.run_in_executor(None, store.refresh)
    except FileNotFoundError as exc:
        raise WalError(f"no walasync log at {path} (no such directory)") from exc
    except NotADirectoryError as exc:
        raise WalError(f"no walasync log at {path} (not a directory)") from exc
    except OSError as exc:
        raise map_os_error(exc, f"opening {path}") from exc
    return ReadOnlyWal(store, next_lsn, poll_interval)


def open_readonly(
    path: str | os.PathLike[str], io: FileIO, poll_interval: float, max_record_size: int
) -> Opener[ReadOnlyWal]:
    """See `walasync.open(path, readonly=True)`."""
    if not os.fspath(path):
        raise ValueError("a log path must not be empty (use '.' for the current directory)")
    if poll_interval <= 0:
        raise ValueError(f"poll_interval must be > 0, not {poll_interval!r}")
    if (
        not isinstance(max_record_size, int)
        or isinstance(max_record_size, bool)
        or max_record_size <= 0
    ):
        raise ValueError(f"max_record_size must be a positive int, not {max_record_size!r}")
    where = os.fspath(path)
    return Opener(lambda: _open_readonly(where, io, poll_interval, max_record_size))

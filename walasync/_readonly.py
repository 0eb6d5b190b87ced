"""`ReadOnlyWal`: a log opened for reading while another process may be writing it.

It takes no lock and never writes: no repair, no truncation, no spare. What it knows of the
log comes from looking at the files (`Store.refresh`): META, the segment list, and the
batches written since it last looked, read incrementally. A torn or half-written tail is
simply where the data ends for now. The writer may rotate, truncate and cut the log under
it: a vanished segment or a cut is reported as `TruncatedError`, never read as garbage.

Checksums and per-segment salts reject stale or foreign bytes, but not the batches the
writer writes after a truncate_back (the cut segment keeps its file and salt): only META
tells a reader of a cut. So each read looks at META again after each chunk it reads
(`_reader._read_then_look`) and stops at a cut it finds there; a read goes up to what the
look before it found, and stops at any cut seen after that look read META. Two cuts or
more between two looks are taken for one at the lowest LSN they could have removed
(`Meta.cut_since`). A cut seen drops the seal indexes kept for sealed segments and has the
last segment read again from its header (`Store.look_at_meta`).

Opened with `durable_only=True`, each look also makes what it found durable before it
counts it: it fdatasyncs every segment file that gained records since its last look (an
fdatasync flushes a file through any descriptor), then re-reads META; a truncate_back
committed meanwhile means the records it saw may have been rewritten, so it looks again.
After a cut it syncs again from the cut on (from the lowest possible one after several).
Such a reader never yields a record that a power loss could take back: a shipper in
another process (`walasync replicate`) can pass on what it reads.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncGenerator, Callable
from types import TracebackType
from typing import TypeVar

from ._io import FileIO
from ._opener import Opener, require_loop
from ._reader import Batch, Record, cut_ahead, cuts_since, read_batches, read_records
from ._store import Store
from .errors import ClosedError, TruncatedError, WalError, map_os_error

__all__ = ("ReadOnlyWal", "open_readonly")

T = TypeVar("T", Record, Batch)


class _Durable:
    """What a `durable_only` reader has made durable: records below `synced`, as of the
    first `seen` of the store's `cuts`."""

    def __init__(self) -> None:
        self.synced = 0
        self.seen = 0

    def look(self, store: Store) -> tuple[int, int]:
        """`store.refresh()`, then fdatasync what it found beyond `synced` (on a thread)."""
        io = store.io
        nxt, ncuts = store.refresh()
        while True:
            cuts = store.cuts
            if len(cuts) != self.seen:
                # Cut back since the last look: what follows the cut may be rewritten (the
                # lowest LSN it may start at, when META showed more than one cut).
                self.synced = min(self.synced, *cuts[self.seen :])
            if store.meta.cut:
                self.synced = min(self.synced, store.meta.cut)
            self.seen = len(cuts)
            if nxt <= self.synced:
                return nxt, ncuts
            segments = store.snapshot()
            for first in segments[store.locate(self.synced, segments) :]:
                try:
                    fd = io.open_read(store.segment_path(first))
                except FileNotFoundError:  # truncated away: a read will say so
                    continue
                try:
                    io.fdatasync(fd)
                finally:
                    io.close(fd)
            store.reload_meta()
            if len(store.cuts) == ncuts:  # no cut since `refresh` read META
                self.synced = nxt
                return nxt, ncuts
            nxt, ncuts = store.refresh()  # a cut committed while it synced: look again


class ReadOnlyWal:
    """A log opened with `walasync.open(path, readonly=True)`: reads, never writes.

    `last_lsn` is the end of the valid data as of the last look (at open, at each `read`,
    `refresh` and, with `follow=True`, every `poll_interval` seconds); with
    `durable_only`, of the durable data (see the module's docstring).
    """

    def __init__(
        self, store: Store, look: tuple[int, int], poll_interval: float, durable: _Durable | None
    ) -> None:
        self._store = store
        self._loop = asyncio.get_running_loop()
        # The last look: the LSN after the data it found, and how many of the store's
        # `cuts` it had seen when it read META (a read up to there stops at any later one).
        self._next, self._ncuts = look
        self._poll = poll_interval
        self._durable = durable
        self._looking = asyncio.Lock()  # one look at a time: readers may overlap
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
    def log_id(self) -> bytes:
        """The log's identity (as `Wal.log_id`); empty for a log without META."""
        return self._store.meta.log_id

    @property
    def cuts(self) -> int:
        """`Wal.cuts`, as of the last look."""
        return self._store.meta.cuts

    @property
    def last_cut(self) -> int:
        """`Wal.last_cut`, as of the last look."""
        return self._store.meta.last_cut

    @property
    def durable_only(self) -> bool:
        """True if opened with `durable_only=True`: `last_lsn` and reads stop at what is
        durable (this reader fdatasyncs what it finds)."""
        return self._durable is not None

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
            async with self._looking:
                self._next, self._ncuts = await self._loop.run_in_executor(
                    None, _look, self._store, self._durable
                )
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
        return self._read(start, end, follow, read_records, _after_record)

    def read_batches(
        self, start: int | None = None, end: int | None = None, *, follow: bool = False
    ) -> AsyncGenerator[Batch, None]:
        """As `read`, a `walasync.Batch` at a time, with the positions where `append_many`
        units go on (as `Wal.read_batches`): for a consumer that copies records in bulk.

        Raises as `read` does.
        """
        self._check()
        if start is not None and start < 1:
            raise ValueError(f"start must be >= 1, not {start}")
        return self._read(start, end, follow, read_batches, _after_batch)

    async def _read(
        self,
        start: int | None,
        end: int | None,
        follow: bool,
        reader: Callable[[Store, tuple[int, ...], int, int, int], AsyncGenerator[T, None]],
        after: Callable[[T], int],
    ) -> AsyncGenerator[T, None]:
        await self.refresh()
        lsn = self.first_lsn if start is None else start
        if lsn < self.first_lsn:
            raise TruncatedError(f"records below {self.first_lsn} were truncated")
        store = self._store
        cuts = store.cuts
        seen = self._ncuts
        while True:
            seen = cuts_since(cuts, seen, lsn)
            ncuts = self._ncuts  # the cuts the look that found `last_lsn` had seen
            stop = self.last_lsn if end is None else min(end, self.last_lsn)
            if lsn <= stop:
                try:
                    async for item in reader(store, store.snapshot(), lsn, stop, ncuts):
                        yield item
                        lsn = after(item)
                except TruncatedError:
                    if not follow or not cut_ahead(store, ncuts, lsn):
                        raise
                    if self._closed:
                        return
                    await self.refresh()
                    continue
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


def _after_record(rec: Record) -> int:
    return rec.lsn + 1


def _after_batch(batch: Batch) -> int:
    return batch.lsn + len(batch.records)


def _look(store: Store, durable: _Durable | None) -> tuple[int, int]:
    return store.refresh() if durable is None else durable.look(store)


async def _open_readonly(
    path: str, io: FileIO, poll_interval: float, max_record_size: int, durable_only: bool
) -> ReadOnlyWal:
    loop = asyncio.get_running_loop()
    durable = _Durable() if durable_only else None
    try:
        store = await loop.run_in_executor(None, Store.open_readonly, io, path)
        store.max_record_size = max_record_size
        look = await loop.run_in_executor(None, _look, store, durable)
    except FileNotFoundError as exc:
        raise WalError(f"no walasync log at {path} (no such directory)") from exc
    except NotADirectoryError as exc:
        raise WalError(f"no walasync log at {path} (not a directory)") from exc
    except OSError as exc:
        raise map_os_error(exc, f"opening {path}") from exc
    return ReadOnlyWal(store, look, poll_interval, durable)


def open_readonly(
    path: str | os.PathLike[str],
    io: FileIO,
    poll_interval: float,
    max_record_size: int,
    durable_only: bool = False,
) -> Opener[ReadOnlyWal]:
    """See `walasync.open(path, readonly=True)`."""
    if not os.fspath(path):
        raise ValueError("a log path must not be empty (use '.' for the current directory)")
    if (
        not isinstance(poll_interval, (int, float))
        or isinstance(poll_interval, bool)
        or not 0 < poll_interval < math.inf
    ):
        raise ValueError(f"poll_interval must be a number of seconds > 0, not {poll_interval!r}")
    if not isinstance(durable_only, bool):
        raise ValueError(f"durable_only must be True or False, not {durable_only!r}")
    if (
        not isinstance(max_record_size, int)
        or isinstance(max_record_size, bool)
        or max_record_size <= 0
    ):
        raise ValueError(f"max_record_size must be a positive int, not {max_record_size!r}")
    where = os.fspath(path)
    return Opener(lambda: _open_readonly(where, io, poll_interval, max_record_size, durable_only))

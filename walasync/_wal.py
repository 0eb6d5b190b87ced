"""`Wal`, the open log: ties the catalogue, the batcher and the reader together.

`OSError`s become walasync's errors through `errors.map_os_error` only (failures of a
write or fdatasync become `BrokenLogError` in the batcher, which owns that state).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
import warnings
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator
from types import TracebackType

from ._appender import Appender
from ._batcher import Batcher
from ._compress import Compressor
from ._io import FileIO
from ._options import Durability, Options
from ._reader import Batch, Record, follow_batches, follow_records, read_batches, read_records
from ._stats import Stats
from ._store import LastSegment, SegmentInfo, Store
from ._worker import Worker
from .errors import BrokenLogError, ClosedError, TruncatedError, WalError, map_os_error

DropHook = Callable[[SegmentInfo], Awaitable["bool | None"]]
_log = logging.getLogger("walasync")

__all__ = ("Wal", "open_wal")

Buffer = bytes | bytearray | memoryview
_NO_END = 1 << 64  # past every LSN (a u64 on disk): a follower without `end`


def _as_bytes(data: object) -> bytes:
    """A private, immutable copy of a bytes-like record (the caller may reuse its buffer)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"a record must be bytes, bytearray or memoryview, not {type(data).__name__}")


@contextlib.contextmanager
def _os_errors(what: str) -> Iterator[None]:
    """Map an OSError to a WalError naming what failed, chained to the original."""
    try:
        yield
    except WalError:
        raise
    except OSError as exc:
        raise map_os_error(exc, what) from exc


def _open_files(
    io: FileIO, path: str, options: Options, first_lsn: int | None
) -> tuple[Store, LastSegment]:
    """Lock and recover the log (on the I/O thread)."""
    store = Store.open(io, path)
    store.max_record_size = options.max_record_size
    if options.compression is not None:
        store.compress = Compressor(options.compression_level)
    try:
        last = store.recover(options.segment_size, first_lsn)
        if options.durability is Durability.NONE:
            # A NONE writer seals segments without fdatasync: one may still be unflushed.
            # Open makes what it recovered durable (synced_lsn starts at last_lsn).
            try:
                store.sync_sealed()
            except BaseException:
                io.close(last.fd)
                raise
        return store, last
    except BaseException:
        store.close()
        raise


def _release(appender: Appender, store: Store, sync: bool = False) -> None:
    """Close the writer's files, then release the lock (on the I/O thread)."""
    try:
        appender.close(sync)
    finally:
        store.close()


def _close_files(store: Store, last: LastSegment) -> None:
    """Undo `_open_files` for a log that never became a `Wal`."""
    try:
        store.io.close(last.fd)
    finally:
        store.close()


class Wal:
    """An open write-ahead log; get one from `walasync.open`.

    Use it from the event loop that opened it. `append` returns once the record is durable
    (in the default durability mode); `read` streams records back in LSN order.
    """

    def __init__(
        self,
        store: Store,
        last: LastSegment,
        worker: Worker,
        options: Options,
        io: FileIO,
        on_segment_drop: DropHook | None = None,
    ) -> None:
        self._store = store
        self._worker = worker
        self._io = io
        self.options = options
        self.on_segment_drop = on_segment_drop
        retains = options.retention_bytes is not None or options.retention_age is not None
        self._batcher = Batcher(
            store, last, worker, options, self._retain_soon if retains else None
        )
        self._retainer: asyncio.Task[None] | None = None
        self._dropping: SegmentInfo | None = None  # the segment a retention pass is at
        # The sizes of the segments sealed before open, read in the background (for stats).
        self._measurer: asyncio.Task[None] | None = None
        if len(store.segments) > 1:
            self._measurer = asyncio.ensure_future(self._measure())
        self._put = self._batcher.put  # bound once: `append` is the hot path
        self._closer: asyncio.Future[None] | None = None
        self._closed = False
        self._lifecycle = asyncio.Lock()  # one truncation or retention pass at a time

    @property
    def path(self) -> str:
        """The log's directory (absolute)."""
        return self._store.path

    @property
    def log_id(self) -> bytes:
        """16 random bytes chosen when the log was created and never changed: what a
        snapshot or copy made from this log records, to tell later that it belongs to it."""
        return self._store.meta.log_id

    @property
    def first_lsn(self) -> int:
        """The oldest LSN that can be read: where the log started (1 by default), or the
        LSN passed to the last `truncate_front`. Above `last_lsn` when the log is empty."""
        return self._store.meta.first_lsn

    @property
    def last_lsn(self) -> int:
        """Highest acknowledged LSN (0 for an empty log); durable in `Durability.FSYNC`."""
        return self._batcher.acked_lsn

    @property
    def synced_lsn(self) -> int:
        """Highest LSN known to be fdatasync'd (equal to `last_lsn` in `Durability.FSYNC`)."""
        return self._batcher.synced_lsn

    @property
    def cuts(self) -> int:
        """How many `truncate_back` calls were ever committed on this log (kept in META):
        only a cut changes the records at LSNs the log had, so a shipper that labels what
        it ships with this count tells later, in O(1), whether the log was cut back since."""
        return self._store.meta.cuts

    @property
    def last_cut(self) -> int:
        """The first LSN the last committed `truncate_back` removed (0: never cut)."""
        return self._store.meta.last_cut

    @property
    def closed(self) -> bool:
        """True once `close()` has begun."""
        return self._closer is not None

    async def _measure(self) -> None:
        """Read the sizes of the segments sealed before open, one `stat` each, in the
        executor (so that neither open, nor the loop, nor the I/O thread waits for them),
        then hand them to the store on the I/O thread, which alone changes them."""
        store = self._store
        loop = asyncio.get_running_loop()
        try:
            sizes = await loop.run_in_executor(None, store.stat_sealed, store.segments[:-1])
            await self._worker.run(store.measured, sizes)
        except OSError as exc:  # only the stats lack them
            _log.warning("could not read the sizes of %s's segments: %s", self.path, exc)

    def stats(self) -> Stats:
        """A snapshot of the log's counters, histograms and state (see `walasync.Stats`).

        Cheap (no system call, no lock: counters are kept per batch) and callable from any
        thread, such as a metrics scraper's, and after `close()`. Its fields are read one
        after the other while the log runs, so they may be up to a batch apart.
        """
        b = self._batcher
        a = b.appender
        store = self._store
        return Stats(
            path=store.path,
            appends=b.appends,
            records=b.records,
            appended_bytes=b.appended_bytes,
            batches=b.batches,
            batch_records=b.batch_records.snapshot(),
            append_seconds=b.append_seconds.snapshot(),
            sync_seconds=a.sync_seconds.snapshot(),
            slow_syncs=a.slow_syncs,
            pending_records=b.pending,
            pending_bytes=b.pending_bytes,
            in_flight_records=b.in_flight,
            waiting_appenders=b.waiting,
            segments=len(store.segments),
            disk_bytes=store.sealed_bytes + max(a.alloc, a.end),
            first_lsn=store.meta.first_lsn,
            last_lsn=b.acked_lsn,
            synced_lsn=b.synced_lsn,
            closed=self.closed,
            failure=b.failure,
        )

    async def append(self, data: Buffer) -> int:
        """Append one record and return its LSN once it is acknowledged (durable by default).

        If the caller is cancelled after the record was queued, the record may still be
        written and become durable; it just gets no LSN back.

        Raises:
            TypeError: `data` is not bytes, bytearray or memoryview.
            RecordTooLargeError: `data` is larger than `max_record_size`.
            ClosedError: the log is closed.
            BrokenLogError: a write or fdatasync failed; reopen the log.
        """
        if type(data) is not bytes:
            data = _as_bytes(data)
        return await self._put(data)

    async def append_many(self, records: Iterable[Buffer]) -> range:
        """Append records as one atomic unit: after a crash, all of them are there or none.

        Returns the range of their LSNs. Their total size counts against
        `max_record_size`. Raises as `append` does.
        """
        self._batcher.check()
        datas = [d if type(d) is bytes else _as_bytes(d) for d in records]
        if not datas:
            nxt = self._batcher.next_lsn + self._batcher.pending
            return range(nxt, nxt)
        first = await self._batcher.put_many(datas)
        return range(first, first + len(datas))

    def read(
        self, start: int | None = None, end: int | None = None, *, follow: bool = False
    ) -> AsyncGenerator[Record, None]:
        """Iterate over records with LSNs from `start` (default: the first) to `end`.

        `end` defaults to, and is capped at, `last_lsn` at the time of this call: the
        iteration sees every record acknowledged before it, and none after. It streams in
        bounded memory and may run while appends continue.

        With `follow=True` it does not stop there: it yields every record from `start` on
        once it is durable (up to `synced_lsn`: `last_lsn` in `Durability.FSYNC`, the last
        sync in the relaxed modes), waits for more without polling, and ends after `end`
        (default: never) or once the log is closed and every record durable by then was
        yielded.

        Raises:
            ValueError: `start` is below 1.
            ClosedError: the log is closed.
            WrongLoopError: called from another event loop or thread.

        Raises (during iteration):
            CorruptionError: an invalid batch or a gap in the LSNs, naming file and offset.
            WalError: a read failed.
            BrokenLogError: following, the log failed; raised once every record durable
                before the failure was yielded.
        """
        segments, start, stop = self._span(start, end, follow)
        if follow:
            return follow_records(self._store, self._batcher, start, stop)
        return read_records(self._store, segments, start, stop)

    def _span(
        self, start: int | None, end: int | None, follow: bool
    ) -> tuple[tuple[int, ...], int, int]:
        """A read's snapshot of the segments and its first and last LSN, checked."""
        self._batcher.check_loop()
        if self.closed:
            raise ClosedError("the log is closed")
        segments = self._store.snapshot()  # before first_lsn: no truncation slips between
        first = self.first_lsn
        start = first if start is None else start
        if start < 1:
            raise ValueError(f"start must be >= 1, not {start}")
        if start < first:
            raise TruncatedError(f"records below {first} were truncated (asked from {start})")
        if follow:
            return segments, start, _NO_END if end is None else end
        return segments, start, self.last_lsn if end is None else min(end, self.last_lsn)

    def read_batches(
        self, start: int | None = None, end: int | None = None, *, follow: bool = False
    ) -> AsyncGenerator[Batch, None]:
        """As `read`, but a `Batch` of records at a time (the records of one group commit,
        or the part of them from `start` to `end`), with the positions where their
        `append_many` units go on (`Batch.joined`): for a consumer that ships or copies
        records in bulk and must not split a unit. A unit is never split across batches.

        Raises as `read` does.
        """
        segments, start, stop = self._span(start, end, follow)
        if follow:
            return follow_batches(self._store, self._batcher, start, stop, units=True)
        return read_batches(self._store, segments, start, stop)

    async def truncate_front(self, lsn: int) -> None:
        """Remove every record below `lsn`: `first_lsn` becomes `lsn` (if higher), and the
        segment files holding only such records are deleted, giving their space back.

        Returns once the new `first_lsn` is durable: no crash brings a removed record back,
        and none at or above `lsn` is lost. A read that asks for removed records raises
        `TruncatedError`, one already past them goes on. `lsn` may be `last_lsn + 1`
        (remove everything; the next append still gets `last_lsn + 1`).

        Raises:
            ValueError: `lsn` is below 1 or above `last_lsn + 1`.
            ClosedError, WrongLoopError, WalError (the OSError that stopped it is the cause).
        """
        self._batcher.check()
        async with self._lifecycle:
            # Checked holding the lock: a truncate_back before it may have lowered last_lsn.
            if not 1 <= lsn <= self.last_lsn + 1:
                raise ValueError(f"truncate_front({lsn}): lsn must be in 1..{self.last_lsn + 1}")
            if self.synced_lsn < lsn - 1:  # relaxed modes: what stays must be durable first
                await self._batcher.sync()
            with _os_errors(f"truncating {self.path}"):
                await self._worker.run(self._store.truncate_front, lsn)

    async def truncate_back(self, lsn: int) -> None:
        """Remove every record after `lsn` (undo a suffix, as a Raft follower must): the
        next append gets `lsn + 1`. Durable when it returns: no crash brings a removed
        record back, and none at or below `lsn` is lost.

        Appends made before the call are written first (and removed if they land after
        `lsn`); appends made while it runs wait, and follow the cut. A read that reaches
        removed records raises `TruncatedError`.

        Raises:
            ValueError: `lsn` is below `first_lsn - 1` or above `last_lsn`, or the record
                at `lsn` is not the last of its `append_many` unit (nothing changes).
            BrokenLogError: the cut failed; reopening the log finishes it.
            ClosedError, WrongLoopError.
        """
        self._batcher.check()
        async with self._lifecycle:
            await self._batcher.truncate_back(lsn, self.first_lsn)

    async def apply_retention(self) -> list[SegmentInfo]:
        """Drop the oldest sealed segments that the retention options (`retention_bytes`,
        `retention_age`) no longer keep, as `truncate_front` would, and return them.

        Before each drop, `on_segment_drop(segment)` (if given to `open`) is awaited: it
        may archive the file (copy `segment.path`), or return False to keep it and every
        later one. The last segment and anything not yet durable are never dropped. Runs
        by itself after every rotation when a retention option is set.

        Raises:
            ClosedError, WrongLoopError, WalError; whatever the hook raised (nothing more is
            dropped in that pass, and the log goes on).
        """
        self._batcher.check()
        opts = self.options
        if opts.retention_bytes is None and opts.retention_age is None:
            return []
        dropped: list[SegmentInfo] = []
        async with self._lifecycle:
            self._dropping = None
            with _os_errors(f"applying retention to {self.path}"):
                candidates = await self._worker.run(
                    self._store.retention_candidates,
                    opts.retention_bytes,
                    opts.retention_age,
                    time.time(),
                    self._batcher.synced_lsn,
                )
            for segment in candidates:
                self._dropping = segment  # for the warning of a pass after a rotation
                hook = self.on_segment_drop
                if hook is not None and await hook(segment) is False:
                    break
                with _os_errors(f"dropping {segment.path}"):
                    await self._worker.run(self._store.truncate_front, segment.last_lsn + 1)
                dropped.append(segment)
            self._dropping = None
        return dropped

    def _retain_soon(self) -> None:
        """After a rotation: a retention pass, unless one is running."""
        if self._retainer is None or self._retainer.done():
            self._retainer = asyncio.ensure_future(self._retain())

    async def _retain(self) -> None:
        try:
            await self.apply_retention()
        except (ClosedError, BrokenLogError):
            pass
        except Exception as exc:
            segment = self._dropping
            _log.warning(
                "retention of %s failed%s: %r; the log goes on",
                self.path,
                "" if segment is None else f" at {segment.path}",
                exc,
                exc_info=True,
            )

    async def sync(self) -> None:
        """Return once everything appended so far is fdatasync'd (for the relaxed modes).

        Raises:
            ClosedError: the log is closed.
            BrokenLogError: the fdatasync failed; reopen the log.
            WrongLoopError: called from another event loop or thread.
        """
        self._batcher.check_loop()
        if self.closed:
            raise ClosedError("the log is closed")
        await self._batcher.sync()

    async def close(self) -> None:
        """Write out every queued append, then release the files and the lock.

        Idempotent; shielded, so cancelling the caller does not interrupt the closing.

        Raises:
            WrongLoopError: called from another event loop or thread (the log stays open).
        """
        self._batcher.check_loop()
        if self._closer is None:
            self._batcher.refuse()  # at once: `closed` is True from here on
            self._closer = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closer)

    async def _close(self) -> None:
        for task in (self._retainer, self._measurer):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        try:
            await self._batcher.close()
        finally:
            healthy = self._batcher.failure is None
            try:
                with _os_errors(f"closing {self.path}"):
                    await self._worker.run(self._close_files, healthy)
            finally:
                self._worker.stop()
                self._closed = True

    def _close_files(self, sync: bool) -> None:
        _release(self._batcher.appender, self._store, sync)

    async def __aenter__(self) -> Wal:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __del__(self) -> None:
        if getattr(self, "_closer", 1) is None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1, source=self)
            self._batcher.abandon()
            self._worker.stop(functools.partial(_release, self._batcher.appender, self._store))

    def __repr__(self) -> str:
        b = self._batcher
        if self._closed:
            state = "closed"
        elif self.closed:
            state = "closing"
        else:
            state = "broken" if b.failure else "open"
        return (
            f"<Wal {self.path!r} {state} first_lsn={self.first_lsn} last_lsn={b.acked_lsn} "
            f"synced_lsn={b.synced_lsn} pending={b.pending} in_flight={b.in_flight} "
            f"durability={self.options.durability.value}>"
        )


async def open_wal(
    path: str, options: Options, io: FileIO, first_lsn: int | None, on_drop: DropHook | None
) -> Wal:
    worker = Worker(f"walasync-io {os.path.basename(path)}")
    fut = worker.run(_open_files, io, path, options, first_lsn)
    try:
        with _os_errors(f"opening {path}"):
            store, last = await asyncio.shield(fut)
    except asyncio.CancelledError:
        # The opening may still succeed on the thread: close what it opened.
        fut.add_done_callback(
            lambda f: worker.stop(
                None if f.cancelled() or f.exception() else lambda: _close_files(*f.result())
            )
        )
        raise
    except BaseException:
        worker.stop()
        raise
    return Wal(store, last, worker, options, io, on_drop)

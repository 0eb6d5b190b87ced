"""`Wal`, the open log: ties the catalogue, the batcher and the reader together.

`OSError`s become walasync's errors through `errors.map_os_error` only (failures of a
write or fdatasync become `BrokenLogError` in the batcher, which owns that state).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import warnings
from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from types import TracebackType
from typing import Any

from ._appender import Appender
from ._batcher import Batcher
from ._io import FileIO
from ._options import Durability, Options
from ._reader import Record, follow_records, read_records
from ._store import LastSegment, Store
from ._worker import Worker
from .errors import ClosedError, WalError, map_os_error

__all__ = ("Wal", "open")

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


def _open_files(io: FileIO, path: str, options: Options) -> tuple[Store, LastSegment]:
    """Lock and recover the log (on the I/O thread)."""
    store = Store.open(io, path)
    try:
        return store, store.recover(options.segment_size)
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
        self, store: Store, last: LastSegment, worker: Worker, options: Options, io: FileIO
    ) -> None:
        self._store = store
        self._worker = worker
        self._io = io
        self.options = options
        self._batcher = Batcher(store, last, worker, options)
        self._put = self._batcher.put  # bound once: `append` is the hot path
        self._closer: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def path(self) -> str:
        """The log's directory (absolute)."""
        return self._store.path

    @property
    def first_lsn(self) -> int:
        """LSN of the oldest record in the log (1 unless the front was removed)."""
        return self._store.segments[0]

    @property
    def last_lsn(self) -> int:
        """Highest acknowledged LSN (0 for an empty log); durable in `Durability.FSYNC`."""
        return self._batcher.acked_lsn

    @property
    def synced_lsn(self) -> int:
        """Highest LSN known to be fdatasync'd (equal to `last_lsn` in `Durability.FSYNC`)."""
        return self._batcher.synced_lsn

    @property
    def closed(self) -> bool:
        """True once `close()` has begun."""
        return self._closer is not None

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
    ) -> AsyncIterator[Record]:
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
        self._batcher.check_loop()
        if self.closed:
            raise ClosedError("the log is closed")
        first = self.first_lsn
        start = first if start is None else start
        if start < 1:
            raise ValueError(f"start must be >= 1, not {start}")
        if follow:
            stop = _NO_END if end is None else end
            return follow_records(self._store, self._batcher, max(start, first), stop)
        stop = self.last_lsn if end is None else min(end, self.last_lsn)
        return read_records(self._store, self._store.snapshot(), max(start, first), stop)

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
            self._closer = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closer)

    async def _close(self) -> None:
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

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_closer", 1) is None:
            _warn(f"unclosed {self!r}", ResourceWarning, source=self)
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


class _Opener:
    """What `open` returns: await it for a `Wal`, or use it as `async with`."""

    def __init__(self, path: str | os.PathLike[str], options: Options, io: FileIO) -> None:
        self._path = os.fspath(path)
        self._options = options
        self._io = io
        self._wal: Wal | None = None

    def __await__(self) -> Generator[Any, None, Wal]:
        return self._open().__await__()

    async def __aenter__(self) -> Wal:
        self._wal = await self._open()
        return self._wal

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._wal is not None
        await self._wal.close()

    async def _open(self) -> Wal:
        opts = self._options
        worker = Worker(f"walasync-io {os.path.basename(self._path)}")
        fut = worker.run(_open_files, self._io, self._path, opts)
        try:
            with _os_errors(f"opening {self._path}"):
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
        return Wal(store, last, worker, opts, self._io)


def open(
    path: str | os.PathLike[str],
    *,
    io: FileIO | None = None,
    durability: Durability | str = Options.durability,
    segment_size: int = Options.segment_size,
    max_record_size: int = Options.max_record_size,
    max_batch_bytes: int = Options.max_batch_bytes,
    max_batch_delay: float = Options.max_batch_delay,
    max_pending_bytes: int = Options.max_pending_bytes,
    sync_interval: float = Options.sync_interval,
) -> _Opener:
    """Open (creating if needed) the log in directory `path`, lock it and recover it.

    Use `wal = await walasync.open(path)` or `async with walasync.open(path) as wal:`.
    The options are those of `walasync.Options` (see README.md, "Options"). `io` swaps the
    I/O layer (`walasync.FileIO` or a subclass), to observe or inject faults in tests.

    Raises:
        ValueError: `path` is empty, or an option is out of range.
        LockedError: another `Wal`, in this process or another, has the log open.
        CorruptionError: the last segment is damaged beyond a torn tail, or segments are
            missing after it.
        DiskFullError: the disk has no room for the first segment.
        WalError: the directory cannot be created, opened or locked.
    """
    if not os.fspath(path):
        raise ValueError("a log path must not be empty (use '.' for the current directory)")
    options = Options(
        durability=Durability(durability),
        segment_size=segment_size,
        max_record_size=max_record_size,
        max_batch_bytes=max_batch_bytes,
        max_batch_delay=max_batch_delay,
        max_pending_bytes=max_pending_bytes,
        sync_interval=sync_interval,
    )
    return _Opener(path, options, io or FileIO())

"""The writer of the last segment: batches in, durable bytes out; rotation and the spare.

Everything here blocks and runs on the log's I/O thread, so calls happen in submission
order. Invariants:

- Only the last segment is written, at `end`, one batch at a time: a batch's write starts
  after the one before it is durable (in the syncing modes).
- A segment appears under its final name only after its header is durable, and the
  directory is fsynced before any record in it is acknowledged.
- Rotation seals the old segment once the new one exists durably, and before any record
  goes into the new one: a seal frame (the segment's index) written at its end, and the
  file cut right after it. So a sealed segment that is last means segments were lost.
- The next segment is preallocated ahead of need on a second thread once the last one is
  half full (etcd keeps a spare the same way), so a rotation costs a header write, a
  rename, a seal and a few fsyncs, and writes never grow the file, which would make each
  fdatasync commit the file's size too.
- With a file system that leaves preallocated blocks unwritten, `ZeroAhead` zeroes the
  blocks just ahead of the writer; every batch `claim`s its range first, so no zero lands
  on a record.
- Each durable write of a batch, and each fdatasync, is timed (one clock pair), counted in
  `sync_seconds`, and logged as a warning past `slow_sync` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from time import perf_counter as _clock

from . import _format as fmt
from . import _meta
from . import _segment as seg
from ._stats import SECOND_BOUNDS, Buckets
from ._store import LastSegment, Store
from ._zeroing import ZeroAhead

__all__ = ("Appender", "NotWritten", "StoreFailed")

_log = logging.getLogger("walasync")

# Zeroing ahead pays for batches up to this size: a larger write gains less from written
# blocks (1 MiB: 0.7 instead of 0.9 ms) than the zeros cost the disk.
_SMALL_BATCH = 32 << 10


class NotWritten(Exception):
    """A batch was not written at all: making its new segment failed before the log was
    touched. The cause is an OSError; the log stays usable."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(cause)
        # Kept apart from `__cause__`, which compiled code (mypyc) does not set on `raise from`.
        self.cause = cause


class StoreFailed(Exception):
    """A write or fdatasync failed earlier: nothing more is written (a retried fdatasync
    could report success for pages the kernel already dropped)."""


class Appender:
    """Owns the last segment's file descriptor and the spare; driven by the batcher."""

    def __init__(
        self,
        store: Store,
        last: LastSegment,
        segment_size: int,
        *,
        fsync: bool,
        pressed: Callable[[], bool] = lambda: False,
        slow_sync: float | None = None,
    ) -> None:
        self.store = store
        self.io = store.io
        self.segment_size = segment_size
        self.fsync = fsync
        self._pressed = pressed  # whether more batches wait behind the one being written
        self.fd = last.fd
        self.first = last.first_lsn  # of the last segment
        self.salt = last.salt
        self.version = last.version  # of the last segment's format
        self.end = last.end  # where the next batch goes
        self.next_lsn = last.next_lsn
        self.index = last.index
        self.alloc = last.size  # the last segment's file size, before writes past it
        self.rotations = 0  # segments started by this writer
        self.sync_seconds = Buckets(SECOND_BOUNDS)  # durable writes and fdatasyncs, timed
        self.slow_sync = slow_sync  # seconds: a durable write longer than this is logged
        self.slow_syncs = 0
        self._dirty = False  # written since the last fdatasync of the last segment
        self.failed: BaseException | None = None  # the write or fdatasync that failed
        self._refused: BaseException | None = None  # why the last batch was NotWritten
        self._unsynced: list[str] = []  # sealed segments never fdatasync'd (NONE mode)
        self._spare_pool = ThreadPoolExecutor(1, thread_name_prefix="walasync-prealloc")
        self._spare: Future[tuple[int, int, int]] | None = None  # (fd, previous salt, size)
        io = self.io
        self._zero = ZeroAhead(io, segment_size) if io.leaves_unwritten() else None
        if self._zero is not None and not last.recycled:
            self._zero.use(store.segment_path(self.first), self.end)

    def write_batch(
        self, first_lsn: int, records: Sequence[bytes], sync: bool, joined: Sequence[int] = ()
    ) -> None:
        """Append one batch (rotating first if it does not fit), then fdatasync if `sync`.
        `joined`: positions of records whose unit goes on with the next record.

        Raises:
            NotWritten: the batch's segment could not be started, or the batch before it
                was not written (its LSNs would leave a gap).
            StoreFailed: an earlier write or fdatasync failed; nothing more is written.
        """
        if self.failed is not None:
            raise StoreFailed("an earlier write or fdatasync failed") from self.failed
        if first_lsn != self.next_lsn:
            if self._refused is not None and first_lsn > self.next_lsn:
                raise NotWritten(self._refused) from self._refused
            raise AssertionError(f"batch LSN {first_lsn} != expected {self.next_lsn}")
        try:
            self._write(first_lsn, records, sync, joined)
        except NotWritten as refused:
            self._refused = refused.cause
            raise
        except BaseException as exc:  # (named apart: compiled, one name has one type)
            self.failed = exc
            raise
        self._refused = None

    def _encode(
        self, first_lsn: int, records: Sequence[bytes], joined: Sequence[int]
    ) -> tuple[bytes, bytes]:
        # Compressed batches only go into a segment whose format version says they may.
        compress = self.store.compress if self.version >= fmt.ZSTD_VERSION else None
        return fmt.encode_batch(first_lsn, records, self.salt, joined, compress)

    def _write(
        self, first_lsn: int, records: Sequence[bytes], sync: bool, joined: Sequence[int]
    ) -> None:
        head, body = self._encode(first_lsn, records, joined)
        size = len(head) + len(body)
        if self.end + size > self.segment_size and self.end > fmt.SEGMENT_HEADER:
            self._rotate(first_lsn)
            head, body = self._encode(first_lsn, records, joined)  # new salt
            size = len(head) + len(body)
        if self._zero is not None:
            self._zero.claim(self.end + size)
        if sync:
            start = _clock()
            self.io.write_durable(self.fd, (head, body), self.end)
            self._timed(start, size)
        else:
            self.io.pwritev(self.fd, (head, body), self.end)
            self._dirty = True
        if self._zero is not None and (size > _SMALL_BATCH or self._pressed()):
            self._zero.press()
        self.index.add(first_lsn, self.end)
        self.end += size
        self.next_lsn += len(records)
        if self._spare is None and self.end > self.segment_size // 2:
            self._spare = self._spare_pool.submit(self._make_spare)

    def _timed(self, start: float, size: int, path: str | None = None) -> None:
        """Count a durable write of `size` bytes (0: an fdatasync) to `path` (default: the
        last segment) that began at `start`; warn if it was slow."""
        took = _clock() - start
        self.sync_seconds.add(took)
        if self.slow_sync is not None and took > self.slow_sync:
            self.slow_syncs += 1
            what = f"a durable write of {size} bytes" if size else "an fdatasync"
            path = path or self.store.segment_path(self.first)
            _log.warning(
                "%s: %s to %s took %.3g s (over slow_sync_warning, %g s): the disk is slow",
                self.store.path,
                what,
                os.path.basename(path),
                took,
                self.slow_sync,
            )

    def sync(self) -> None:
        """fdatasync whatever was written since its last fdatasync: the last segment, and
        segments sealed without one (in NONE mode), oldest first."""
        if self.failed is not None:
            raise StoreFailed("an earlier write or fdatasync failed") from self.failed
        try:
            self._sync()
        except BaseException as exc:
            self.failed = exc
            raise

    def _sync(self) -> None:
        while self._unsynced:
            try:
                fd = self.io.open(self._unsynced[0])  # fdatasync flushes it, by any fd
            except FileNotFoundError:  # truncated away meanwhile: nothing left to flush
                del self._unsynced[0]
                continue
            try:
                start = _clock()
                self.io.fdatasync(fd)
                self._timed(start, 0, self._unsynced[0])
            finally:
                self.io.close(fd)
            del self._unsynced[0]
        if self._dirty:
            start = _clock()
            self.io.fdatasync(self.fd)
            self._timed(start, 0)
            self._dirty = False

    def truncate_back(self, lsn: int) -> None:
        """Remove every record after `lsn` (nothing may be in flight): the next batch gets
        `lsn + 1`. Everything at or below `lsn` is made durable first; then the cut is
        committed in META, carried out, and the segment holding `lsn` is the last one.

        Raises:
            ValueError: the cut would split an `append_many` unit (nothing changed).
            StoreFailed: an earlier write or fdatasync failed.
            OSError: the cut failed; the log must be reopened, which finishes the cut if
                it was committed.
        """
        target = lsn + 1
        if target >= self.next_lsn:
            return
        self.sync()
        store = self.store
        offset, batch = store.plan_cut(target)
        try:
            meta = store.meta.with_(
                cut=target,
                cut_offset=offset,
                cut_batch=batch,
                cuts=store.meta.cuts + 1,
                last_cut=target,
            )
            _meta.write_meta(self.io, store.path, meta)
            # Committed: readers learn of the cut now, before anything is removed (the
            # cut first, then the META whose change makes them look).
            store.cuts.append(target)
            store.cutting = target
            store.meta = meta
            self.io.close(self.fd)
            self.fd = -1
            store.cut(self.segment_size)
            last = store.recover_last(self.segment_size)
        except BaseException as exc:
            self.failed = store.cut_failed = exc
            raise
        self.fd, self.first, self.salt = last.fd, last.first_lsn, last.salt
        self.version = last.version
        self.end, self.next_lsn, self.index = last.end, last.next_lsn, last.index
        self.alloc = last.size
        self._dirty = False
        self._refused = None
        if self._zero is not None:
            self._zero.use("" if last.recycled else store.segment_path(self.first), self.end)

    def _rotate(self, first_lsn: int) -> None:
        """Start the segment for `first_lsn`, seal the old one, and make the new one last.

        Raises:
            NotWritten: the new segment could not be prepared (the disk is full, say); the
                log is untouched and the next batch will try again.
        """
        spare_path = os.path.join(self.store.path, seg.SPARE_NAME)
        spare, self._spare = self._spare, None
        try:
            fd, previous, alloc = spare.result() if spare is not None else self._make_spare()
        except OSError as exc:
            self._discard(-1, spare_path)
            raise NotWritten(exc) from exc
        if self.fsync:
            # The old segment's records are durable before the new one can exist: no
            # segment may outlive a batch of the one before it. A failure breaks the log.
            try:
                self.sync()
            except BaseException:
                self._discard(fd, spare_path)
                raise
        seal = fmt.encode_seal(first_lsn, self.index.lsns, self.index.offsets, self.salt)
        if self._zero is not None:
            self._zero.claim(self.end + len(seal))  # no zeros over the seal
        version = self.store.new_version()
        try:
            salt = seg.install(
                self.io, fd, spare_path, self.store.path, first_lsn, previous, version
            )
        except OSError as exc:
            self._discard(fd, spare_path)
            raise NotWritten(exc) from exc
        self.io.fsync_dir(self.store.path)
        # The new segment exists durably: seal the old one, durably before any record goes
        # into the new one (a sealed last segment then proves its successor was lost).
        old_fd = self.fd
        self.io.pwritev(old_fd, (seal,), self.end)
        sealed = self.end + len(seal)
        self.io.truncate(old_fd, sealed)
        if self.fsync:
            self.io.fdatasync(old_fd)
        else:  # NONE mode: flushed by the next sync()
            self._unsynced.append(self.store.segment_path(self.first))
        self.fd = fd
        self.io.close(old_fd)
        self.first, self.salt, self.version = first_lsn, salt, version
        self.end = fmt.SEGMENT_HEADER
        self.alloc = alloc
        self.next_lsn = first_lsn
        self.index = seg.Index()
        self.store.add(first_lsn, self.index, sealed)
        self.rotations += 1
        self._dirty = False
        if self._zero is not None:  # a recycled file's blocks are written already
            self._zero.use("" if previous else self.store.segment_path(first_lsn), self.end)

    def _discard(self, fd: int, spare_path: str) -> None:
        """Drop a spare file that will not become a segment (best effort)."""
        with contextlib.suppress(OSError):
            if fd >= 0:
                self.io.close(fd)
            self.io.unlink(spare_path)

    def _make_spare(self) -> tuple[int, int, int]:
        recycled = self.store.take_recycled()
        fd, previous = seg.make_spare(self.io, self.store.path, self.segment_size, recycled)
        try:
            return fd, previous, self.io.size(fd)
        except BaseException:
            self.io.close(fd)
            raise

    def close(self, sync: bool = True) -> None:
        """Close the last segment and drop the spare; first fdatasync if `sync` (and fsync
        is on). After a failed fdatasync, close with `sync=False`: a retry could report
        success for pages the kernel already dropped."""
        try:
            if self.fd >= 0 and sync and self.fsync:
                self.sync()
        finally:
            if self._zero is not None:
                self._zero.stop()
            self._drop_spare()
            if self.fd >= 0:
                self.io.close(self.fd)
                self.fd = -1

    def _drop_spare(self) -> None:
        spare, self._spare = self._spare, None
        self._spare_pool.shutdown(wait=True)
        if spare is not None and spare.exception() is None:
            self.io.close(spare.result()[0])
        with contextlib.suppress(FileNotFoundError):
            self.io.unlink(os.path.join(self.store.path, seg.SPARE_NAME))

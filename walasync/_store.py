"""The directory of segments: the lock, recovery on open, rotation and the spare segment.

Every method blocks and runs on the log's I/O thread (`open` included), so their order is
the order of submission. Invariants:

- Segment files are named by their first LSN and never overlap; only the last is written.
- A segment appears under its final name only after its header is durable, and the
  directory is fsynced before any record in it is acknowledged.
- The next segment is preallocated ahead of need on a second thread, once the last segment
  is half full (etcd keeps a spare file ready the same way), so a rotation costs a header
  write, a rename and two fsyncs, and writes never grow the file, which would make each
  fdatasync commit the file's size too.
- With a real file system, `ZeroAhead` zeroes the blocks just ahead of the writer in the
  last segment; every batch `claim`s its range first, so no zero lands on a record.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from . import _format as fmt
from . import _segment as seg
from ._io import FileIO
from ._zeroing import ZeroAhead
from .errors import LockedError

__all__ = ("NotWritten", "Store", "StoreFailed")

LOCK_NAME = "LOCK"
# Zeroing ahead pays for batches up to this size: a larger write gains less from written
# blocks (1 MiB: 0.7 instead of 0.9 ms) than the zeros cost the disk.
_SMALL_BATCH = 32 << 10


class NotWritten(Exception):
    """A batch was not written at all: making its new segment failed before the log was
    touched. The cause is an OSError; the log stays usable."""


class StoreFailed(Exception):
    """A write or fdatasync failed earlier: the store writes nothing more (a retried
    fdatasync could report success for pages the kernel already dropped)."""


class Store:
    """An open log directory, owning its lock and the file descriptor of the last segment."""

    def __init__(
        self, io: FileIO, path: str, segment_size: int, lock_fd: int, *, fsync: bool
    ) -> None:
        self.io = io
        self.path = path
        self.segment_size = segment_size
        self.fsync = fsync
        self._lock_fd = lock_fd
        self.segments: list[int] = []  # first LSN of each segment, ascending
        self.fd = -1
        self.salt = 0  # of the last segment
        self.end = 0  # where the next batch goes in the last segment
        self.next_lsn = 1
        self._dirty = False  # written since the last fdatasync of the last segment
        self.failed: BaseException | None = None  # the write or fdatasync that failed
        self._refused: BaseException | None = None  # why the last batch was NotWritten
        self._unsynced: list[str] = []  # sealed segments never fdatasync'd (NONE mode)
        self._spare_pool = ThreadPoolExecutor(1, thread_name_prefix="walasync-prealloc")
        self._spare: Future[int] | None = None
        self._zero = ZeroAhead(io, segment_size) if io.leaves_unwritten() else None
        # Whether more batches wait behind the one being written (set by the batcher).
        self.pressed: Callable[[], bool] = lambda: False

    @classmethod
    def open(cls, io: FileIO, path: str, segment_size: int, fsync: bool = True) -> Store:
        """Lock the directory (creating it if needed) and recover its last segment.

        Raises:
            LockedError: another opener holds the lock.
            CorruptionError: the last segment's header or data is damaged.
        """
        path = os.path.abspath(path)
        # The log's directory entry, and those of any parents made here, must be durable
        # before any record is acknowledged; an earlier opener may have been killed before
        # making them so, so this runs at every open.
        for parent in sorted({os.path.dirname(d) for d in [*io.makedirs(path), path]}):
            io.fsync_dir(parent)
        lock_fd = io.open(os.path.join(path, LOCK_NAME), create=True)
        try:
            io.lock(lock_fd)
        except BlockingIOError:
            io.close(lock_fd)
            raise LockedError(f"{path} is open in another Wal (its LOCK file is held)") from None
        store = cls(io, path, segment_size, lock_fd, fsync=fsync)
        try:
            store._recover()
        except BaseException:
            store.close(sync=False)
            raise
        return store

    def _recover(self) -> None:
        names = self.io.listdir(self.path)
        if seg.SPARE_NAME in names:
            self.io.unlink(os.path.join(self.path, seg.SPARE_NAME))
        self.segments = sorted(lsn for lsn in map(seg.parse_name, names) if lsn is not None)
        if not self.segments:
            self.fd = self._make_spare()
            salt = seg.install(
                self.io, self.fd, os.path.join(self.path, seg.SPARE_NAME), self.path, 1
            )
            self.io.fsync_dir(self.path)
            self._became_last(1, salt)
            return
        last = self.segments[-1]
        path = self.segment_path(last)
        self.fd = self.io.open(path)
        self.salt = seg.read_header(self.io, self.fd, path, last)
        self.end, self.next_lsn = seg.recover_tail(self.io, self.fd, path, last, self.salt)
        # A writer killed between a write and its fdatasync, or between a rename and the
        # directory's fsync, leaves state that the page cache shows but the disk may not
        # have. Make it durable before building on it or reporting it as last_lsn.
        self.io.fdatasync(self.fd)
        self.io.fsync_dir(self.path)
        if self._zero is not None:
            self._zero.use(path, self.end)

    def segment_path(self, first_lsn: int) -> str:
        return os.path.join(self.path, seg.segment_name(first_lsn))

    def write_batch(self, first_lsn: int, records: Sequence[bytes], sync: bool) -> None:
        """Append one batch (rotating first if it does not fit), then fdatasync if `sync`.

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
            self._write(first_lsn, records, sync)
        except NotWritten as exc:
            self._refused = exc.__cause__
            raise
        except BaseException as exc:
            self.failed = exc
            raise
        self._refused = None

    def _write(self, first_lsn: int, records: Sequence[bytes], sync: bool) -> None:
        head, body = fmt.encode_batch(first_lsn, records, self.salt)
        size = len(head) + len(body)
        if self.end + size > self.segment_size and self.end > fmt.SEGMENT_HEADER:
            self._rotate(first_lsn)
            head, body = fmt.encode_batch(first_lsn, records, self.salt)  # the new salt
        if self._zero is not None:
            self._zero.claim(self.end + size)
        if sync:
            self.io.write_durable(self.fd, (head, body), self.end)
        else:
            self.io.pwritev(self.fd, (head, body), self.end)
            self._dirty = True
        if self._zero is not None and (size > _SMALL_BATCH or self.pressed()):
            self._zero.press()
        self.end += size
        self.next_lsn += len(records)
        if self._spare is None and self.end > self.segment_size // 2:
            self._spare = self._spare_pool.submit(self._make_spare)

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
            fd = self.io.open(self._unsynced[0])  # fdatasync flushes the file, by any fd
            try:
                self.io.fdatasync(fd)
            finally:
                self.io.close(fd)
            del self._unsynced[0]
        if self._dirty:
            self.io.fdatasync(self.fd)
            self._dirty = False

    def _rotate(self, first_lsn: int) -> None:
        """Start the segment for `first_lsn` and make it the last one.

        Raises:
            NotWritten: the new segment could not be prepared (the disk is full, say); the
                log is untouched and the next batch will try again.
        """
        spare_path = os.path.join(self.path, seg.SPARE_NAME)
        spare, self._spare = self._spare, None
        try:
            fd = spare.result() if spare is not None else self._make_spare()
        except OSError as exc:
            self._discard(-1, spare_path)
            raise NotWritten(exc) from exc
        if self.fsync:
            # Seal the old segment before the new one can exist: no segment may outlive a
            # batch of the one before it. A failure here breaks the log.
            try:
                self.sync()
            except BaseException:
                self._discard(fd, spare_path)
                raise
        try:
            salt = seg.install(self.io, fd, spare_path, self.path, first_lsn)
        except OSError as exc:
            self._discard(fd, spare_path)
            raise NotWritten(exc) from exc
        self.io.fsync_dir(self.path)
        if self._dirty:  # NONE mode: remember it for the next sync()
            self._unsynced.append(self.segment_path(self.segments[-1]))
        old_fd, self.fd = self.fd, fd
        self.io.close(old_fd)
        self._became_last(first_lsn, salt)

    def _discard(self, fd: int, spare_path: str) -> None:
        """Drop a spare file that will not become a segment (best effort)."""
        with contextlib.suppress(OSError):
            if fd >= 0:
                self.io.close(fd)
            self.io.unlink(spare_path)

    def _became_last(self, first_lsn: int, salt: int) -> None:
        if not self.segments or self.segments[-1] != first_lsn:
            self.segments.append(first_lsn)
        self.salt = salt
        self.end = fmt.SEGMENT_HEADER
        self.next_lsn = first_lsn
        self._dirty = False
        if self._zero is not None:
            self._zero.use(self.segment_path(first_lsn), self.end)

    def _make_spare(self) -> int:
        """Create the spare file, preallocated to the segment size, durably."""
        fd = self.io.open(os.path.join(self.path, seg.SPARE_NAME), create=True)
        try:
            self.io.truncate(fd, 0)
            self.io.preallocate(fd, self.segment_size)
            self.io.fdatasync(fd)
        except BaseException:
            self.io.close(fd)
            raise
        return fd

    def close(self, sync: bool = True) -> None:
        """Close every file and release the lock; first fdatasync if `sync` (and fsync is on).

        After a failed fdatasync, close with `sync=False`: a retry could report success for
        pages the kernel already dropped.
        """
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
            if self._lock_fd >= 0:
                self.io.close(self._lock_fd)
                self._lock_fd = -1

    def _drop_spare(self) -> None:
        spare, self._spare = self._spare, None
        self._spare_pool.shutdown(wait=True)
        if spare is not None and spare.exception() is None:
            self.io.close(spare.result())
        try:
            self.io.unlink(os.path.join(self.path, seg.SPARE_NAME))
        except FileNotFoundError:
            pass

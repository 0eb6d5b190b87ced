"""The catalogue of a log directory: the lock, recovery, and the list of segments.

Every method that touches files blocks and runs on the log's I/O thread. Readers on the
event loop take `snapshot()`, an immutable tuple of first LSNs that the I/O thread replaces
(never mutates) when a segment is added. Recovery is two steps: `scan` only reads (what a
read-only opener and a verifier need); `recover` scans, then repairs what a crashed writer
left (a torn tail, an empty segment after an unsealed one) and makes it durable.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from dataclasses import dataclass

from . import _format as fmt
from . import _segment as seg
from ._io import FileIO
from .errors import CorruptionError, LockedError

__all__ = ("LOCK_NAME", "LastSegment", "Store")

LOCK_NAME = "LOCK"


@dataclass
class LastSegment:
    """The last segment as recovery left it, open read-write (or read-only), for the writer."""

    fd: int
    first_lsn: int
    salt: int
    end: int  # where the next batch goes
    next_lsn: int
    index: seg.Index


class Store:
    """An open log directory: its lock and its segments."""

    def __init__(self, io: FileIO, path: str, lock_fd: int, names: list[str]) -> None:
        self.io = io
        self.path = path
        self._lock_fd = lock_fd
        self._spare = seg.SPARE_NAME in names  # left by a writer that was killed
        # First LSN of each segment, ascending; replaced, never mutated.
        self.segments: tuple[int, ...] = tuple(
            sorted(lsn for lsn in map(seg.parse_name, names) if lsn is not None)
        )
        # The index of each segment that has one known: the last segment's (kept by the
        # writer as it writes), and those of sealed segments read so far.
        self.indexes: dict[int, seg.Index] = {}

    @classmethod
    def open(cls, io: FileIO, path: str) -> Store:
        """Lock the directory, creating it (durably) if needed.

        Raises:
            ValueError: `path` is empty.
            LockedError: another opener holds the lock.
            OSError: the directory cannot be made, listed or locked.
        """
        if not path:
            raise ValueError("a log path must not be empty")
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
        try:
            names = io.listdir(path)
        except BaseException:
            io.close(lock_fd)
            raise
        return cls(io, path, lock_fd, names)

    def segment_path(self, first_lsn: int) -> str:
        return os.path.join(self.path, seg.segment_name(first_lsn))

    def snapshot(self) -> tuple[int, ...]:
        """The segments as of now: an immutable tuple of their first LSNs."""
        return self.segments

    def locate(self, lsn: int, segments: tuple[int, ...] | None = None) -> int:
        """Position in `segments` (default: the current ones) of the segment holding `lsn`
        (0 if `lsn` is before the first)."""
        segments = self.segments if segments is None else segments
        return max(bisect_right(segments, lsn) - 1, 0)

    def add(self, first_lsn: int, index: seg.Index) -> None:
        """A new last segment starting at `first_lsn` exists; the writer keeps `index`."""
        self.indexes[first_lsn] = index
        self.segments = (*self.segments, first_lsn)

    def recover(self, segment_size: int, first_lsn: int = 1) -> LastSegment:
        """Recover the last segment for writing (creating the first one, starting at
        `first_lsn` and preallocated to `segment_size`, in an empty directory), repair what
        a crashed writer left, and make it durable.

        Raises:
            CorruptionError: the last segment's header or data is damaged, or it is sealed
                (the segments after it are missing).
        """
        io = self.io
        if self._spare:
            io.unlink(os.path.join(self.path, seg.SPARE_NAME))
            self._spare = False
        expected: int | None = None  # where the data must end, once an empty segment went
        while True:
            if not self.segments:
                return self._create(segment_size, first_lsn)
            last = self.segments[-1]
            path = self.segment_path(last)
            fd = io.open(path)
            try:
                salt = seg.read_header(io, fd, path, last)
                tail = seg.scan_tail(io, fd, path, last, salt)
                if expected is not None and tail.next_lsn != expected:
                    raise CorruptionError(
                        path, tail.end, f"expected LSN {expected}, found the end of the data"
                    )
                if tail.sealed:
                    missing = self.segment_path(tail.next_lsn)
                    raise CorruptionError(
                        missing,
                        0,
                        f"segment missing: {os.path.basename(path)} was sealed after this "
                        "segment was created, and records in it may have been acknowledged",
                    )
                if self._drop_if_unsealed_successor(tail):
                    expected = last
                else:
                    seg.repair_tail(io, fd, path, tail)
                    # A writer killed between a write and its fdatasync, or between a rename
                    # and the directory's fsync, leaves state that the page cache shows but
                    # the disk may not have. Make it durable before building on it.
                    io.fdatasync(fd)
                    io.fsync_dir(self.path)
                    self.indexes[last] = tail.index
                    return LastSegment(fd, last, salt, tail.end, tail.next_lsn, tail.index)
            except BaseException:
                io.close(fd)
                raise
            io.close(fd)

    def _drop_if_unsealed_successor(self, tail: seg.Tail) -> bool:
        """Remove the last segment if it is empty and the one before it is not sealed: a
        writer was killed between creating it and sealing its predecessor, and no record
        went into it. The predecessor then becomes the last segment again, so that every
        segment but the last is sealed."""
        if tail.next_lsn != self.segments[-1] or len(self.segments) < 2:
            return False
        prev = self.segments[-2]
        path = self.segment_path(prev)
        fd = self.io.open_read(path)
        try:
            salt = seg.read_header(self.io, fd, path, prev)
            if seg.read_seal(self.io, fd, salt) is not None:
                return False
            # A seal whose file was not cut yet when the writer died: look for it in place.
            if seg.scan_tail(self.io, fd, path, prev, salt).sealed:
                return False
        finally:
            self.io.close(fd)
        self.io.unlink(self.segment_path(self.segments[-1]))
        self.io.fsync_dir(self.path)
        self.segments = self.segments[:-1]
        return True

    def _create(self, segment_size: int, first_lsn: int) -> LastSegment:
        fd = seg.make_spare(self.io, self.path, segment_size)
        try:
            spare = os.path.join(self.path, seg.SPARE_NAME)
            salt = seg.install(self.io, fd, spare, self.path, first_lsn)
            self.io.fsync_dir(self.path)
        except BaseException:
            self.io.close(fd)
            raise
        self.segments = (first_lsn,)
        self.indexes[first_lsn] = index = seg.Index()
        return LastSegment(fd, first_lsn, salt, fmt.SEGMENT_HEADER, first_lsn, index)

    def close(self) -> None:
        """Release the lock."""
        if self._lock_fd >= 0:
            self.io.close(self._lock_fd)
            self._lock_fd = -1

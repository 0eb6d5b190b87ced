"""The catalogue of a log directory: the lock, recovery, and the list of segments.

Every method that touches files blocks and runs on the log's I/O thread. Readers on the
event loop take `snapshot()`, an immutable tuple of first LSNs that the I/O thread replaces
(never mutates) when a segment is added. Reading the last segment's tail and repairing it
are two steps, in `_segment`: `scan_tail` only reads (the writer's recovery, and `verify`,
`describe` and `repair` too), `repair_tail` zeroes a torn tail. `recover` (the writer's
open) finishes a cut in progress, deletes what a committed truncation left, then
`recover_last` scans the last segment, drops an empty one after an unsealed one, repairs the
tail and makes it durable. A read-only store (`open_readonly`) never repairs: `refresh`
reads META, the segment list and the batches written since its last look.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from bisect import bisect_right
from dataclasses import dataclass
from typing import NamedTuple

from . import _format as fmt
from . import _meta
from . import _segment as seg
from ._compress import Compressor
from ._io import FileIO
from ._meta import Meta, MetaError, MetaVersionError
from ._options import Options
from .errors import CorruptionError, LockedError, NotALogError, UnsupportedFormatError

__all__ = ("LOCK_NAME", "LastSegment", "SegmentInfo", "Store")

LOCK_NAME = "LOCK"
_log = logging.getLogger("walasync")


@dataclass
class LastSegment:
    """The last segment as recovery left it, open read-write (or read-only), for the writer."""

    fd: int
    first_lsn: int
    salt: int
    end: int  # where the next batch goes
    next_lsn: int
    index: seg.Index
    recycled: bool = False  # the file was an older segment's: no zeros needed ahead
    version: int = fmt.FORMAT_VERSION  # of its header: ZSTD_VERSION may hold compressed batches
    size: int = 0  # of the file, preallocated room included


class SegmentInfo(NamedTuple):
    """A sealed segment, as retention's `on_segment_drop` hook sees it before it goes."""

    path: str  # the file: copy it to archive it
    first_lsn: int
    last_lsn: int
    size: int  # bytes
    mtime: float  # when it was last written (sealed), seconds since the epoch


class Store:
    """An open log directory: its lock and its segments."""

    def __init__(self, io: FileIO, path: str, lock_fd: int, names: list[str]) -> None:
        self.io = io
        self.path = path
        self._lock_fd = lock_fd
        self._spare = seg.SPARE_NAME in names  # left by a writer that was killed
        self._recycled = seg.RECYCLE_NAME in names  # a freed segment waits to be reused
        self._recycle_lock = threading.Lock()  # taken by the spare's thread too
        self._meta_tmp = _meta.TMP_NAME in names  # likewise
        self.meta = Meta(b"", 0, 0)  # set by `recover`
        # First LSN of each segment, ascending; replaced, never mutated.
        self.segments: tuple[int, ...] = tuple(
            sorted(lsn for lsn in map(seg.parse_name, names) if lsn is not None)
        )
        # The index of each segment that has one known: the last segment's (kept by the
        # writer as it writes), and those of sealed segments read so far.
        self.indexes: dict[int, seg.Index] = {}
        # The file size of each segment but the last, and their total, for `Wal.stats()`:
        # those sealed by this writer as they are; the others once `measure` has read them.
        # Changed on the I/O thread only.
        self.sealed_sizes: dict[int, int] = {}
        self.sealed_bytes = 0
        self.cuts: list[int] = []  # the first LSN each truncate_back removes, from its commit
        # The first LSN a truncate_back removes, from its commit until the writer's
        # watermarks (last_lsn, synced_lsn) show it; 0 when no cut is under way.
        self.cutting = 0
        # How many of `cuts` a read starting now has behind it: set in one step (on the
        # writer's loop once its watermarks show a cut), so a read never takes a cut that
        # is under way for one made before it (see `_reader._cuts_before`).
        self.cuts_done = 0
        # Why a committed cut failed on the way (the log is broken, META still shows it).
        self.cut_failed: BaseException | None = None
        self.readonly = False
        self._tail: LastSegment | None = None  # (read-only) the last segment as last seen
        # (Read-only.) A look takes META under this lock, so that looks on several threads
        # (`refresh`, and each read after each chunk) take what it says in the order read.
        # `cut_epoch` counts the looks that saw a cut begin or end: an index or a tail read
        # before one may describe bytes the writer has rewritten since, and is not kept.
        self._meta_lock = threading.Lock()
        self._looked = False
        self.cut_epoch = 0
        self._tail_epoch = -1
        # How batches are written and read back: the writer's compressor (None: plain
        # batches, segments of the default format version), and the largest record that
        # readers accept when expanding a compressed batch.
        self.compress: Compressor | None = None
        self.max_record_size = Options.max_record_size

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

    @classmethod
    def open_readonly(cls, io: FileIO, path: str) -> Store:
        """A catalogue for reading a log another process may be writing: no lock, and
        nothing is ever written.

        Raises:
            FileNotFoundError: there is no directory at `path`.
        """
        if not path:
            raise ValueError("a log path must not be empty")
        path = os.path.abspath(path)
        store = cls(io, path, -1, io.listdir(path))
        store.readonly = True
        return store

    def refresh(self) -> tuple[int, int]:
        """(Read-only stores.) Look at the log again, reading only what changed: META, the
        list of segments, the batches written since. Returns the LSN after the last valid
        batch, and how many `cuts` the store had seen when it read META: a read up to that
        LSN must stop at any cut seen after (it may have read records written after it).
        A torn or half-written tail is where the data ends for now.

        Raises:
            CorruptionError: not a walasync log (no segment), or META is damaged.
        """
        while True:
            found = self._look()
            if found is not None:
                return found

    def _look(self) -> tuple[int, int] | None:
        """`refresh`, or None if the last segment listed was gone when it was opened (the
        writer removed it meanwhile): look again."""
        io = self.io
        meta, epoch, ncuts = self.look_at_meta()
        names = io.listdir(self.path)
        segments = tuple(sorted(lsn for lsn in map(seg.parse_name, names) if lsn is not None))
        if not segments:
            if meta is not None:
                raise CorruptionError(
                    self.segment_path(meta.first_lsn),
                    0,
                    "segment missing: the log has no segment files left",
                )
            raise NotALogError(self.path, 0, "not a walasync log: it has no segment file")
        if meta is None:
            with self._meta_lock:
                if not self.meta.log_id:  # else META has appeared meanwhile
                    self.meta = Meta(b"", segments[0], segments[0])
                meta = self.meta
        tail = self._tail
        # Read the last segment from its header again after a cut (its batches from the
        # cut on are not those scanned), and while one is under way.
        stale = self._tail_epoch != epoch or meta.cut != 0
        while True:
            last = segments[-1]
            if tail is not None and tail.first_lsn == last and not stale:
                break
            path = self.segment_path(last)
            try:
                fd = io.open_read(path)
            except FileNotFoundError:
                return None
            try:
                salt = seg.read_header(io, fd, path, last)
            except UnsupportedFormatError:
                raise
            except CorruptionError:
                if len(segments) == 1:
                    raise
                # A last segment without a valid header holds nothing to read (yet): the
                # data ends before it, as at a torn tail (`verify` tells damage apart).
                segments = segments[:-1]
                continue
            finally:
                io.close(fd)
            tail = LastSegment(-1, last, salt, fmt.SEGMENT_HEADER, last, seg.Index())
            break
        with self._meta_lock:
            if epoch == self.cut_epoch:  # else a cut seen meanwhile: rebuilt next time
                self.indexes[last] = tail.index
            listed = set(segments)
            for first in [first for first in self.indexes if first not in listed]:
                del self.indexes[first]  # removed: their memory back
        self.segments = segments
        path = self.segment_path(last)
        try:
            fd = io.open_read(path)
        except FileNotFoundError:
            return None
        try:
            scan = seg.Scan(io, fd, path, tail.salt, tail.end, tail.next_lsn)
            while scan.end is None:
                for offset, head, _ in scan.batches():
                    tail.index.add(head.first_lsn, offset)
        finally:
            io.close(fd)
        tail.end, tail.next_lsn = scan.offset, scan.next_lsn
        self._tail, self._tail_epoch = tail, epoch
        return (min(tail.next_lsn, meta.cut) if meta.cut else tail.next_lsn), ncuts

    def reload_meta(self) -> None:
        """(Read-only stores.) Re-read META only: after each chunk a read takes, so that a
        cut committed before the chunk was read stops the read; and after a read failed,
        to tell a truncation by the writer from damage."""
        self.look_at_meta()

    def look_at_meta(self) -> tuple[Meta | None, int, int]:
        """(Read-only stores.) Read META and take what changed since the last look: a
        truncate_back committed since goes into `cuts` (the lowest LSN it may have removed:
        `Meta.cut_since`), and the indexes kept for sealed segments are dropped when a cut
        begins or ends. Returns META (None if the log has none), `cut_epoch` and how many
        `cuts` there are, all as of this look."""
        with self._meta_lock:
            meta = self.read_meta()
            if meta is not None and meta != self.meta:
                cut = meta.cut_since(self.meta) if self._looked else 0
                if cut:
                    self.cuts.append(cut)  # readers that began before stop there
                    self.cuts_done = len(self.cuts)
                if cut or meta.cut != self.meta.cut:
                    self.cut_epoch += 1
                    self.indexes.clear()
                self.meta = meta
            self._looked = True
            return meta, self.cut_epoch, len(self.cuts)

    def keep_index(self, first_lsn: int, index: seg.Index, epoch: int) -> seg.Index:
        """Keep the index read from a sealed segment's seal, unless a cut was seen since
        `cut_epoch` was `epoch` (read-only: the seal may be one the cut removed); return
        the index to use."""
        if not self.readonly:
            return self.indexes.setdefault(first_lsn, index)
        with self._meta_lock:
            if epoch == self.cut_epoch:
                return self.indexes.setdefault(first_lsn, index)
        return index

    def recycle(self, path: str) -> bool:
        """Keep a segment file that truncation frees as the next spare (RocksDB's
        `recycle_log_file_num`, PostgreSQL's recycled WAL segments): its blocks are already
        written, so batches cost less there. One at a time; False if one is waiting."""
        with self._recycle_lock:
            if self._recycled or self.readonly:
                return False
            self.io.rename(path, os.path.join(self.path, seg.RECYCLE_NAME))
            self._recycled = True
            return True

    def take_recycled(self) -> bool:
        """Rename the waiting recycled file to the spare's name (on the spare's thread)."""
        with self._recycle_lock:
            if not self._recycled:
                return False
            self.io.rename(
                os.path.join(self.path, seg.RECYCLE_NAME),
                os.path.join(self.path, seg.SPARE_NAME),
            )
            self._recycled = False
            return True

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

    @property
    def first_lsn(self) -> int:
        """The oldest LSN a reader may ask for (records below were truncated)."""
        return self.meta.first_lsn

    def stat_sealed(self, segments: tuple[int, ...]) -> dict[int, int]:
        """The file sizes of `segments` (those still there); reads only, on any thread."""
        sizes = {}
        for first in segments:
            with contextlib.suppress(FileNotFoundError):
                sizes[first] = self.io.stat(self.segment_path(first))[0]
        return sizes

    def measured(self, sizes: dict[int, int]) -> None:
        """Take the sizes `stat_sealed` read (on the I/O thread): of the segments that are
        still sealed ones and whose size is not known yet (truncation and rotation may have
        run in between)."""
        sealed = set(self.segments[:-1])
        for first, size in sizes.items():
            if first in sealed and first not in self.sealed_sizes:
                self.sealed_sizes[first] = size
                self.sealed_bytes += size

    def add(self, first_lsn: int, index: seg.Index, sealed_size: int) -> None:
        """A new last segment starting at `first_lsn` exists; the writer keeps `index`; the
        segment before it was sealed, `sealed_size` bytes long."""
        self.sealed_sizes[self.segments[-1]] = sealed_size
        self.sealed_bytes += sealed_size
        self.indexes[first_lsn] = index
        self.segments = (*self.segments, first_lsn)

    def recover(self, segment_size: int, first_lsn: int | None = None) -> LastSegment:
        """Recover the log for writing, repair what a crashed writer left (a torn tail, an
        empty segment after an unsealed one, a truncation it did not finish), and make it
        durable. In an empty directory, create the log: its first segment starts at
        `first_lsn` (default 1) and is preallocated to `segment_size`.

        Raises:
            ValueError: `first_lsn` differs from the one the log was created with.
            CorruptionError: META or the last segment is damaged, or segments are missing.
        """
        io = self.io
        for leftover, name in ((self._spare, seg.SPARE_NAME), (self._meta_tmp, _meta.TMP_NAME)):
            if leftover:
                io.unlink(os.path.join(self.path, name))
        self._spare = self._meta_tmp = False
        meta = self.read_meta()
        if meta is not None:
            if first_lsn is not None and first_lsn != meta.origin:
                raise ValueError(
                    f"the log at {self.path} starts at LSN {meta.origin}, not {first_lsn}"
                )
            if not self.segments:
                raise CorruptionError(
                    self.segment_path(meta.first_lsn),
                    0,
                    "segment missing: the log has no segment files left",
                )
            self.meta = meta
            if meta.cut:
                self.cut(segment_size)
            self._drop_truncated()
        elif self.segments:
            if first_lsn is not None and first_lsn != self.segments[0]:
                raise ValueError(
                    f"the log at {self.path} starts at LSN {self.segments[0]}, not {first_lsn}"
                )
            first_lsn = self.segments[0]
        last = self.recover_last(segment_size, first_lsn or 1)
        if meta is None:  # a new log, or one written before META existed
            origin = self.segments[0]
            self.meta = Meta(os.urandom(16), origin, origin)
            _meta.write_meta(io, self.path, self.meta)
        return last

    def sync_sealed(self) -> None:
        """fdatasync every sealed segment (those a writer in NONE mode left unflushed)."""
        for first in self.segments[:-1]:
            fd = self.io.open(self.segment_path(first))
            try:
                self.io.fdatasync(fd)
            finally:
                self.io.close(fd)

    def read_meta(self) -> Meta | None:
        """The log's META as it is on disk, or None if it has none.

        Raises:
            CorruptionError: META is damaged (UnsupportedFormatError: of a newer version).
        """
        try:
            return _meta.read_meta(self.io, self.path)
        except MetaError as exc:
            kind = UnsupportedFormatError if isinstance(exc, MetaVersionError) else CorruptionError
            raise kind(os.path.join(self.path, _meta.META_NAME), 0, str(exc)) from None

    def _drop_truncated(self) -> None:
        """Delete the segments wholly below `first_lsn` that a truncation committed but did
        not delete, and check that the segment holding `first_lsn` is there."""
        first = self.meta.first_lsn
        self.truncate_front(first)
        if self.segments[0] > first:
            raise CorruptionError(
                self.segment_path(self.segments[0]),
                0,
                f"segment missing: records {first} to {self.segments[0] - 1} are gone",
            )

    def truncate_front(self, lsn: int) -> list[int]:
        """Make `lsn` the first LSN and delete the segments wholly below it (never the last
        one); return their first LSNs. META is durable before any file goes: a crash in
        between leaves files that the next open deletes."""
        if lsn > self.meta.first_lsn:
            meta = self.meta.with_(first_lsn=lsn)
            _meta.write_meta(self.io, self.path, meta)
            self.meta = meta
        segments = self.segments
        keep = max(bisect_right(segments, lsn) - 1, 0)
        if not keep:
            return []
        self.segments = segments[keep:]  # readers stop seeing them before they go
        gone = list(segments[:keep])
        for first in gone:
            self.indexes.pop(first, None)
            self.sealed_bytes -= self.sealed_sizes.pop(first, 0)
            try:
                if self.recycle(self.segment_path(first)):
                    continue
                self.io.unlink(self.segment_path(first))
            except FileNotFoundError:
                pass
            except OSError as exc:  # committed already: the next open deletes it
                _log.warning("could not delete %s: %s", self.segment_path(first), exc)
        with contextlib.suppress(OSError):  # if lost, the next open deletes them again
            self.io.fsync_dir(self.path)
        return gone

    def retention_candidates(
        self, max_bytes: int | None, max_age: float | None, now: float, durable: int
    ) -> list[SegmentInfo]:
        """The oldest sealed segments that retention would drop, in order: while the log is
        over `max_bytes`, or while a segment was last written more than `max_age` seconds
        before `now`; never the last segment, nor one with records above `durable`."""
        segments = self.segments
        sizes = [self.io.stat(self.segment_path(first)) for first in segments]
        total = sum(size for size, _ in sizes)
        out = []
        for first, following, (size, mtime) in zip(segments, segments[1:], sizes, strict=False):
            over = max_bytes is not None and total > max_bytes
            old = max_age is not None and mtime < now - max_age
            if not (over or old) or following - 1 > durable:
                break
            out.append(SegmentInfo(self.segment_path(first), first, following - 1, size, mtime))
            total -= size
        return out

    def plan_cut(self, target: int) -> tuple[int, bytes]:
        """Where a cut that removes the records from `target` on goes: (offset in the
        segment holding `target`, the batch to write there: the records of the batch
        holding `target` that come before it, or nothing if `target` starts a batch).

        Raises:
            ValueError: the cut would split an `append_many` unit.
        """
        first = self.segments[self.locate(target)]
        path = self.segment_path(first)
        io = self.io
        fd = io.open_read(path)
        try:
            salt = seg.read_header(io, fd, path, first)
            scan = seg.Scan(io, fd, path, salt, fmt.SEGMENT_HEADER, first, self.max_record_size)
            index = self.indexes.get(first)
            found = index.find(target) if index is not None else None
            if found is not None:
                scan.seek(*found)
            scan.skip_to(target)
            offset = scan.offset
            batches = scan.batches(fmt.BATCH_HEADER)
        finally:
            io.close(fd)
        if not batches or batches[0][1].first_lsn >= target:
            return offset, b""
        _, head, payload = batches[0]
        keep = target - head.first_lsn
        joined = [i for i in fmt.joined_records(head, payload) if i < keep]
        # Records kept below first_lsn are unreadable anyway: their unit may be cut.
        if keep - 1 in joined and target > self.meta.first_lsn:
            raise ValueError(f"LSN {target - 1} is inside an append_many unit: cut at a unit's end")
        records = fmt.decode_records(head, payload)[:keep]
        return offset, b"".join(fmt.encode_batch(head.first_lsn, records, salt, joined))

    def cut(self, segment_size: int) -> None:
        """Finish the cut that META records (idempotent; after a crash too): delete the
        segments after the one holding it, newest first; write its batch at its offset,
        zero what follows, make it durable; then clear the cut from META."""
        meta, io = self.meta, self.io
        keep = self.locate(meta.cut)
        first = self.segments[keep]
        for gone in reversed(self.segments[keep + 1 :]):
            self.indexes.pop(gone, None)
            self.sealed_bytes -= self.sealed_sizes.pop(gone, 0)
            with contextlib.suppress(FileNotFoundError):
                io.unlink(self.segment_path(gone))
        self.segments = self.segments[: keep + 1]
        self.sealed_bytes -= self.sealed_sizes.pop(first, 0)  # the last segment from now on
        io.fsync_dir(self.path)
        self.indexes.pop(first, None)  # rebuilt by the recovery of what is now the last
        fd = io.open(self.segment_path(first))
        try:
            end = meta.cut_offset + len(meta.cut_batch)
            if meta.cut_batch:
                io.pwritev(fd, [meta.cut_batch], meta.cut_offset)
            try:
                header = seg.read_full_header(io, fd, self.segment_path(first), first)
            except UnsupportedFormatError:
                raise
            except CorruptionError:
                # `walasync repair` cutting a whole segment whose header is damaged: the
                # segment starts over, empty, under a new header (the seal of the one
                # before it, which names its first LSN, stays true). Idempotent.
                if meta.cut != first or end != fmt.SEGMENT_HEADER:
                    raise
                header = seg.reset_header(io, fd, first)
            seg.zero_after(io, fd, end, header.previous_salt)  # the rest of the batch, later ones
            if io.size(fd) < segment_size:  # sealed, so cut short: room to write again
                io.preallocate(fd, segment_size)
            io.fdatasync(fd)
        finally:
            io.close(fd)
        self.meta = meta.with_(cut=0, cut_offset=0, cut_batch=b"")
        _meta.write_meta(io, self.path, self.meta)

    def recover_last(self, segment_size: int, first_lsn: int = 1) -> LastSegment:
        """Open the last segment for writing (creating the first at `first_lsn` if there is
        none), repair its tail and make it durable."""
        io = self.io
        while True:
            if not self.segments:
                return self._create(segment_size, first_lsn)
            last = self.segments[-1]
            path = self.segment_path(last)
            fd = io.open(path)
            try:
                header = seg.read_full_header(io, fd, path, last)
                salt, recycled = header.salt, header.previous_salt != 0
                tail = seg.scan_tail(io, fd, path, last, salt, header.previous_salt)
                if tail.sealed:
                    missing = self.segment_path(tail.next_lsn)
                    raise CorruptionError(
                        missing,
                        0,
                        f"segment missing: {os.path.basename(path)} was sealed after this "
                        "segment was created, and records in it may have been acknowledged",
                    )
                # (If the empty last segment goes, the loop recovers its predecessor.)
                if not self._drop_if_unsealed_successor(tail):
                    if seg.repair_tail(io, fd, path, tail):
                        _log.warning(
                            "%s: cut a torn tail at offset %d (%d bytes): the last write "
                            "before the writer stopped did not complete; the log goes on "
                            "from LSN %d",
                            path,
                            tail.end,
                            tail.junk - tail.end,
                            tail.next_lsn,
                        )
                    # A writer killed between a write and its fdatasync, or between a rename
                    # and the directory's fsync, leaves state that the page cache shows but
                    # the disk may not have. Make it durable before building on it.
                    io.fdatasync(fd)
                    io.fsync_dir(self.path)
                    self.indexes[last] = tail.index
                    size = io.size(fd)
                    return LastSegment(
                        fd,
                        last,
                        salt,
                        tail.end,
                        tail.next_lsn,
                        tail.index,
                        recycled,
                        header.version,
                        size,
                    )
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
            before = seg.scan_tail(self.io, fd, path, prev, salt)
            if before.sealed:
                return False
        finally:
            self.io.close(fd)
        if before.next_lsn != self.segments[-1]:
            # Records the empty segment's name proves were written are missing: say so
            # before deleting that proof, or the next open would go on without them.
            raise CorruptionError(
                path,
                before.end,
                f"expected LSN {self.segments[-1]}, found the end of the data",
            )
        self.io.unlink(self.segment_path(self.segments[-1]))
        self.io.fsync_dir(self.path)
        self.segments = self.segments[:-1]
        return True

    def _create(self, segment_size: int, first_lsn: int) -> LastSegment:
        if first_lsn < 1:
            raise ValueError(f"first_lsn must be >= 1, not {first_lsn}")
        fd, _ = seg.make_spare(self.io, self.path, segment_size)
        try:
            spare = os.path.join(self.path, seg.SPARE_NAME)
            version = self.new_version()
            salt = seg.install(self.io, fd, spare, self.path, first_lsn, 0, version)
            self.io.fsync_dir(self.path)
        except BaseException:
            self.io.close(fd)
            raise
        self.segments = (first_lsn,)
        self.indexes[first_lsn] = index = seg.Index()
        return LastSegment(
            fd,
            first_lsn,
            salt,
            fmt.SEGMENT_HEADER,
            first_lsn,
            index,
            version=version,
            size=segment_size,
        )

    def new_version(self) -> int:
        """The format version of the segments this writer starts: compressed batches
        only go into segments that older readers refuse."""
        return fmt.ZSTD_VERSION if self.compress is not None else fmt.FORMAT_VERSION

    def close(self) -> None:
        """Release the lock."""
        if self._lock_fd >= 0:
            self.io.close(self._lock_fd)
            self._lock_fd = -1

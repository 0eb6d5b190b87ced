"""`verify`: check every frame of every segment, and find the first problem.

Opening a log scans only its last segment, and a read checks only what it reads, so damage
in a sealed segment stays hidden until a reader reaches it. `verify` walks all of them with
the readers' own `Scan` (checksum, LSN, length of every batch, and every record table), and
the last segment with recovery's own `scan_tail`, and checks that the LSNs run on from one
segment to the next. It reports the first problem with its file and byte offset, and says
where `repair` would cut. Like a read-only opening it takes no lock and never writes: it
works beside a running writer (a problem seen while one runs is looked at a second time,
since the writer may have moved the files on meanwhile).

What is not a problem: a torn tail (the last batch, never acknowledged, half written: open
cuts it), a damaged seal after all of a segment's records (readers only lose its index),
segments wholly below the first LSN (left by an interrupted truncation: open deletes them),
and files that are not walasync's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from . import _compress
from . import _format as fmt
from . import _segment as seg
from ._inspect import look
from ._io import FileIO
from ._meta import Meta
from ._store import LOCK_NAME, Store
from .errors import CorruptionError, NotALogError, UnsupportedFormatError, map_os_error

__all__ = ("Fix", "Problem", "VerifyReport", "check", "verify")

Progress = Callable[[int, int], object]


@dataclass(frozen=True)
class Problem:
    """The first place where a log is not sound: a reader (or open) fails there.

    `lsn` is the first LSN that cannot be read from there on; `offset` the byte offset in
    `path` (a segment file, or META) where the invalid data starts.
    """

    path: str
    offset: int
    lsn: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: offset {self.offset}: {self.reason}"


@dataclass(frozen=True)
class VerifyReport:
    """What `walasync.verify` found. `first_lsn` to `last_lsn` are the records that read
    back intact (up to the problem, if there is one)."""

    path: str
    problem: Problem | None
    notes: tuple[str, ...]  # what is not a problem but worth knowing (a torn tail, ...)
    segments: int  # segment files checked
    records: int  # records checked
    bytes: int  # bytes of segment data checked
    first_lsn: int
    last_lsn: int
    locked: bool  # a writer held the log's lock

    @property
    def ok(self) -> bool:
        return self.problem is None


class Fix(NamedTuple):
    """How `repair` answers a problem: "cut" the log from `lsn` on, at `offset` of the
    segment starting at `segment`; raise the "first_lsn" to `lsn` (records below it were
    lost with their files); or rebuild a damaged "meta"."""

    kind: str
    segment: int = 0
    offset: int = 0
    lsn: int = 0


def verify(
    path: str | os.PathLike[str],
    *,
    io: FileIO | None = None,
    progress: Progress | None = None,
    since: int = 0,
) -> VerifyReport:
    """Check every frame of every segment of the log at `path` and report the first
    problem. Never writes; blocking (from async code, run it in a thread).

    `progress(done, total)` is called as it goes, in bytes of segment files. With `since`,
    the walk starts at the segment holding that LSN (the part before it was checked
    otherwise: `walasync dump` read it); the report counts only what it walked.

    Raises:
        NotALogError: the directory holds no walasync log.
        UnsupportedFormatError: a segment or META is of a format this walasync cannot read.
        WalError: the directory or a file could not be read (the OSError is the cause).
    """
    io = io or FileIO()
    report, _ = check(io, path, progress, since=since)
    # Beside a running writer, a problem may be the writer moving on under the walk (a
    # rotation between listing and reading): real damage stays where it is, so a problem
    # counts once two walks in a row find it at the same place.
    for _ in range(_RECHECKS):
        if report.problem is None or not report.locked:
            break
        again, _ = check(io, path, progress, since=since)
        if again.problem is not None and (again.problem.path, again.problem.offset) == (
            report.problem.path,
            report.problem.offset,
        ):
            return again
        report = again
    return report


_RECHECKS = 8  # walks at most, beside a writer, to tell damage from a race with it


def check(
    io: FileIO,
    path: str | os.PathLike[str],
    progress: Progress | None = None,
    writer_may_run: bool = True,
    since: int = 0,
) -> tuple[VerifyReport, Fix | None]:
    """`verify`, and how to repair what it found (None: nothing to do, or nothing repair
    can do)."""
    where = os.fspath(path)
    try:
        store, meta = look(io, where)
    except (UnsupportedFormatError, NotALogError):
        raise
    except CorruptionError as exc:  # META is damaged
        problem = Problem(exc.path, exc.offset, 0, exc.reason)
        report = VerifyReport(os.path.abspath(where), problem, (), 0, 0, 0, 0, 0, False)
        return report, Fix("meta")
    try:
        walk = _Walk(io, store, meta, progress, writer_may_run)
        return walk.run(since)
    except OSError as exc:
        raise map_os_error(exc, f"reading {store.path}") from exc


class _Walk:
    """One pass of `check` over the segments."""

    def __init__(
        self,
        io: FileIO,
        store: Store,
        meta: Meta | None,
        progress: Progress | None,
        writer_may_run: bool,
    ) -> None:
        self.io = io
        self.store = store
        self.meta = meta
        self.progress = progress
        self.notes: list[str] = []
        self.records = 0
        self.bytes = 0
        self.checked = 0
        lock = os.path.join(store.path, LOCK_NAME)
        self.locked = writer_may_run and LOCK_NAME in io.listdir(store.path) and io.is_locked(lock)
        segments = store.segments
        self.first = meta.first_lsn if meta is not None else segments[0] if segments else 1
        self.last = self.first - 1

    def report(
        self, problem: Problem | None = None, fix: Fix | None = None
    ) -> tuple[VerifyReport, Fix | None]:
        if fix is not None and fix.kind == "cut" and fix.lsn < self.first:
            fix = None  # it would cut records below first_lsn: no log is left to open
        if problem is not None:
            self.last = min(self.last, problem.lsn - 1)
        report = VerifyReport(
            self.store.path,
            problem,
            tuple(self.notes),
            self.checked,
            self.records,
            self.bytes,
            self.first,
            max(self.last, self.first - 1),
            self.locked,
        )
        return report, fix if problem is not None else None

    def run(self, since: int = 0) -> tuple[VerifyReport, Fix | None]:
        store, meta, io = self.store, self.meta, self.io
        segments = store.segments
        if not segments:
            missing = store.segment_path(self.first)
            return self.report(Problem(missing, 0, self.first, "no segment file is left"))
        start = store.locate(self.first)
        if since > self.first:
            start = store.locate(since)
            self.first = max(self.first, segments[start])
        elif start:
            self.notes.append(
                f"{start} segment file(s) below the first LSN {self.first}, left by an "
                "interrupted truncation: the next open deletes them"
            )
        if segments[start] > self.first:
            return self.report(
                Problem(
                    store.segment_path(segments[start]),
                    0,
                    self.first,
                    f"segment missing: records {self.first} to {segments[start] - 1} are gone",
                ),
                Fix("first_lsn", lsn=segments[start]),
            )
        stop = len(segments) - 1
        cut_offset = None
        if meta is not None and meta.cut:
            stop = store.locate(meta.cut)
            cut_offset = meta.cut_offset
            self.notes.append(
                f"a truncate_back was interrupted: the next open finishes it (LSN {meta.cut} "
                "on goes)"
            )
        sizes = [io.stat(store.segment_path(lsn))[0] for lsn in segments[start : stop + 1]]
        total, done = sum(sizes), 0
        for i in range(start, stop + 1):
            found = self._segment(i, stop, cut_offset if i == stop else None, done, total)
            done += sizes[i - start]
            if self.progress is not None:
                self.progress(done, total)
            if found is not None:
                return self.report(*found)
        if meta is not None and meta.cut:
            self.last = meta.cut - 1  # the cut's rewritten batch, in META, ends there
        return self.report()

    def _segment(
        self, i: int, stop: int, cut_offset: int | None, done: int, total: int
    ) -> tuple[Problem, Fix | None] | None:
        """Check segment `i` (the last checked: `stop`); return the problem found in it
        or at its end."""
        io, store = self.io, self.store
        segments = store.segments
        first = segments[i]
        path = store.segment_path(first)
        try:
            fd = io.open_read(path)
        except FileNotFoundError:
            if not self.locked:
                raise
            self.notes.append(f"{path} was removed (by the writer) while verifying")
            return None
        try:
            try:
                header = seg.read_full_header(io, fd, path, first)
            except UnsupportedFormatError:
                raise
            except CorruptionError as exc:
                problem = Problem(path, exc.offset, first, exc.reason)
                return problem, Fix("cut", first, fmt.SEGMENT_HEADER, first)
            self.checked += 1
            scan = seg.Scan(io, fd, path, header.salt, fmt.SEGMENT_HEADER, first)
            if first < self.first and i < len(segments) - 1:
                # Records below the first LSN are dead: as a reader does, go to the first
                # live one through the seal's index and batch headers. (The last segment
                # is walked whole, as open does.)
                seal = seg.read_seal(io, fd, header.salt)
                found = seal.index.find(self.first) if seal is not None else None
                if found is not None:
                    scan.seek(*found)
                scan.skip_to(self.first)
            while scan.end is None:
                for offset, head, payload in scan.batches():
                    if cut_offset is not None and offset >= cut_offset:
                        return None  # the rest goes with the interrupted cut
                    try:
                        # A compressed batch is checked expanded, as a reader decodes it
                        # (the bound: the largest batch any reader accepts).
                        fmt.decode_records(*fmt.expand(head, payload, _compress.MAX_EXPANDED))
                    except ImportError as exc:
                        raise UnsupportedFormatError(
                            path,
                            offset,
                            "a batch compressed with zstd: checking it needs "
                            + _compress.EXTRA_HINT,
                        ) from exc
                    except fmt.FormatError as exc:
                        problem = Problem(path, offset, head.first_lsn, str(exc))
                        return problem, Fix("cut", first, offset, head.first_lsn)
                    self.records += head.nrecords
                    self.last = head.first_lsn + head.nrecords - 1
                if self.progress is not None:
                    self.progress(done + scan.offset, total)
            self.bytes += scan.offset
            if cut_offset is not None:
                return None
            if i == len(segments) - 1:
                return self._tail(fd, path, first, header)
            return self._end(scan, path, first, segments[i + 1])
        finally:
            io.close(fd)

    def _tail(
        self, fd: int, path: str, first: int, header: fmt.SegmentHeader
    ) -> tuple[Problem, Fix | None] | None:
        """The end of the last segment, judged as recovery judges it."""
        tail = seg.scan_tail(self.io, fd, path, first, header.salt, header.previous_salt)
        self.last = tail.next_lsn - 1
        fix = Fix("cut", first, tail.end, tail.next_lsn)
        if tail.sealed:
            name = seg.segment_name(tail.next_lsn)
            if self.locked and name in self.io.listdir(self.store.path):
                self.notes.append(f"the writer started {name} while verifying")
                return None
            reason = f"segment missing: this last segment is sealed, so {name} existed"
            return Problem(path, tail.end, tail.next_lsn, reason), fix
        if tail.corrupt is not None:
            reason = (
                f"invalid bytes before a valid batch at offset {tail.corrupt}: "
                "acknowledged records are missing"
            )
            return Problem(path, tail.end, tail.next_lsn, reason), fix
        if tail.junk > tail.end:
            what = "being written, or torn" if self.locked else "torn"
            self.notes.append(
                f"{path}: offset {tail.end}: {tail.junk - tail.end} bytes of a last batch "
                f"{what} (never acknowledged): open cuts them"
            )
        return None

    def _end(
        self, scan: seg.Scan, path: str, first: int, following: int
    ) -> tuple[Problem, Fix | None] | None:
        """The end of a segment that another follows: its records must run on into it."""
        lsn, offset = scan.next_lsn, scan.offset
        if lsn == following:
            if scan.end == "invalid":
                self.notes.append(
                    f"{path}: offset {offset}: damaged seal after the segment's last record "
                    "(harmless: readers walk the segment instead of using its index)"
                )
            return None
        fix: Fix | None = Fix("cut", first, offset, lsn)
        if lsn > following:
            fix = None
            reason = f"holds records up to {lsn - 1}, but the next segment starts at {following}"
        elif scan.end == "invalid":
            reason = f"expected LSN {lsn}, found an invalid batch"
        elif scan.end == "sealed":
            reason = (
                f"segment missing: sealed before LSN {lsn}, but the next segment starts "
                f"at {following}"
            )
        else:
            reason = (
                f"expected LSN {lsn}, found the end of the segment's data (the next segment "
                f"starts at {following})"
            )
        return Problem(path, offset, lsn, reason), fix

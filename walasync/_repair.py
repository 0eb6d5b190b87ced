"""`repair`: cut a log at its first problem, keeping what it removes in a backup.

The explicit answer to damage that open refuses (invalid bytes before a valid batch in the
last segment, which is also what a power loss in the relaxed durability modes can leave, or
a sealed last segment whose successors were lost) and to damage that reads stop at (a bad
batch in a sealed segment, a gap between segments). etcd's repair does the same and keeps a
`.broken` copy.

Crash-safe, built on truncate_back's commit point, in this order:

1. the lock is taken (a running writer makes repair refuse), and `verify`'s walk finds the
   first problem and where to cut;
2. the backup directory gets, byte for byte, every file the repair will change or remove
   as it is now (the segment it cuts is copied; the later segments and META, which are
   removed or replaced and never written in place, are hard-linked, or copied on another
   file system), each made durable, then the directory entries;
3. the cut is committed in META (as truncate_back does: an atomic rename);
4. recovery's own code carries it out (deletes the later segments, zeroes the cut segment
   from the cut on, clears the cut in META) and makes the log durable.

A crash before 3 leaves the log untouched; after it, the next open (the service's own, or
another repair) finishes the cut, and the backup is already complete. Every I/O goes
through the `FileIO` seam, so the crash simulation tests all of this.

Two more problems have repairs that cut nothing: records missing below the oldest segment
(its file was lost) raise the first LSN to where the data begins, and a damaged META is
rebuilt (a new log id; the first LSN is then the oldest segment's).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass

from . import _format as fmt
from . import _meta
from . import _segment as seg
from ._inspect import look
from ._io import FileIO
from ._meta import META_NAME, Meta
from ._store import LOCK_NAME, Store
from ._verify import Fix, Problem, check
from .errors import (
    CorruptionError,
    LockedError,
    NotALogError,
    UnsupportedFormatError,
    WalError,
    map_os_error,
)

__all__ = ("RepairReport", "repair")

_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)
_MAX_FIXES = 4  # a damaged META, missing first records, then one cut: at most three
_NOTES = "REPAIR.txt"
_LINKLESS = (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK)


@dataclass(frozen=True)
class RepairReport:
    """What `walasync.repair` found and did (or, with `dry_run`, would do).

    `problems` are the problems found, in order (each fix may uncover the next);
    `actions` say in words what was done (or would be) about each. `records_cut` and
    `bytes_cut` count what the cut removed (records at least: those still readable past the damage);
    `cut_from` is the first LSN removed (0: none). `backup` is the directory holding the
    files as they were (None if nothing changed)."""

    path: str
    problems: tuple[Problem, ...]
    actions: tuple[str, ...]
    records_cut: int
    bytes_cut: int
    cut_from: int
    first_lsn: int
    last_lsn: int  # after the repair (before it, for a dry run)
    backup: str | None
    dry_run: bool

    @property
    def repaired(self) -> bool:
        """Whether anything was (or, in a dry run, would be) changed."""
        return bool(self.actions)


@dataclass
class _Plan:
    """One fix, measured."""

    problem: Problem
    fix: Fix
    action: str
    records: int = 0
    nbytes: int = 0
    changed: tuple[str, ...] = ()  # files written in place: copied to the backup
    removed: tuple[str, ...] = ()  # files removed or replaced whole: linked


def repair(
    path: str | os.PathLike[str],
    *,
    io: FileIO | None = None,
    dry_run: bool = False,
    backup: str | os.PathLike[str] | None = None,
) -> RepairReport:
    """Cut the log at `path` at its first problem so that it opens and verifies again,
    keeping a copy of every file it changes or removes in `backup` (default: a new
    directory `broken-<UTC time>` inside the log's). With `dry_run`, only say what it
    would do (it then writes nothing and takes no lock). Blocking.

    Raises:
        LockedError: a writer holds the log (stop it first).
        NotALogError: the directory holds no walasync log.
        UnsupportedFormatError: a segment or META is of a format this walasync cannot read.
        CorruptionError: a problem repair cannot fix (it changed nothing for it).
        WalError: an I/O error (the OSError is the cause; if it came after the commit,
            the next open or repair finishes the cut).
    """
    io = io or FileIO()
    where = os.path.abspath(os.fspath(path))
    try:
        return _repair(io, where, dry_run, os.fspath(backup) if backup is not None else None)
    except OSError as exc:
        raise map_os_error(exc, f"repairing {where}") from exc


def _repair(io: FileIO, where: str, dry_run: bool, backup: str | None) -> RepairReport:
    try:
        look(io, where)  # missing, not a log, newer: say so before anything is created
    except (NotALogError, UnsupportedFormatError):
        raise
    except CorruptionError:
        pass  # a damaged META: repaired below
    plans: list[_Plan] = []
    if dry_run:
        names = io.listdir(where)
        if LOCK_NAME in names and io.is_locked(os.path.join(where, LOCK_NAME)):
            raise LockedError(f"{where} is open in a writer (its LOCK file is held)")
        report, fix = check(io, where, writer_may_run=False)
        if report.problem is not None:
            plans.append(_plan(io, where, report.problem, fix))
        return _report(where, plans, report.first_lsn, report.last_lsn, None, dry_run=True)
    store = Store.open(io, where)  # the lock: LockedError while a writer runs
    target: str | None = None
    try:
        for _ in range(_MAX_FIXES):
            report, fix = check(io, where, writer_may_run=False)
            if report.problem is None:
                break
            plan = _plan(io, where, report.problem, fix)
            if target is None:
                target = _backup_dir(io, where, backup)
            _save(io, where, target, plan)
            _apply(io, store, plan)
            plans.append(plan)
        else:
            raise CorruptionError(where, 0, f"still not sound after {_MAX_FIXES} repairs")
    finally:
        store.close()
    return _report(where, plans, report.first_lsn, report.last_lsn, target, dry_run=False)


def _report(
    where: str, plans: list[_Plan], first: int, last: int, target: str | None, dry_run: bool
) -> RepairReport:
    cuts = [p.fix.lsn for p in plans if p.fix.kind == "cut"]
    return RepairReport(
        path=where,
        problems=tuple(p.problem for p in plans),
        actions=tuple(p.action for p in plans),
        records_cut=sum(p.records for p in plans),
        bytes_cut=sum(p.nbytes for p in plans),
        cut_from=min(cuts, default=0),
        first_lsn=first,
        last_lsn=last,
        backup=target,
        dry_run=dry_run,
    )


def _plan(io: FileIO, where: str, problem: Problem, fix: Fix | None) -> _Plan:
    """What repairing `problem` means: the action, what it removes, which files change."""
    meta_path = os.path.join(where, META_NAME)
    has_meta = META_NAME in io.listdir(where)
    linked = (meta_path,) if has_meta else ()
    if fix is None:
        raise CorruptionError(
            problem.path,
            problem.offset,
            f"{problem.reason} (repair cannot cut there: it would leave no log, or the "
            "damage is not one it knows; nothing was changed)",
        )
    if fix.kind == "meta":
        return _Plan(
            problem,
            fix,
            "rebuild META (a new log id; the first LSN is the oldest segment's)",
            removed=linked,
        )
    if fix.kind == "first_lsn":
        return _Plan(
            problem,
            fix,
            f"raise the first LSN to {fix.lsn}, where the oldest segment begins",
            removed=linked,
        )
    store = Store.open_readonly(io, where)
    segments = store.segments
    k = segments.index(fix.segment)
    later = segments[k + 1 :]
    path = store.segment_path(fix.segment)
    highest, end = _highest(io, store, fix, bool(later))
    start = min(fix.offset, problem.offset)  # a damaged header goes too
    if later:  # the cut segment from the cut on, the sealed ones whole, the last's data
        nbytes = io.stat(path)[0] - start + end
        nbytes += sum(io.stat(store.segment_path(lsn))[0] for lsn in later[:-1])
    else:
        nbytes = max(end - start, 0)
    records = max(highest - fix.lsn + 1, 0)
    action = (
        f"cut the log from LSN {fix.lsn} on ({records:,} records, {nbytes:,} bytes): "
        f"{os.path.basename(path)} from offset {fix.offset}"
        + (f", and {len(later)} later segment file(s)" if later else "")
    )
    return _Plan(
        problem,
        fix,
        action,
        records,
        nbytes,
        changed=(path,),
        removed=(*(store.segment_path(lsn) for lsn in later), *linked),
    )


def _highest(io: FileIO, store: Store, fix: Fix, later: bool) -> tuple[int, int]:
    """(the highest LSN of a valid batch at or after the cut, the end of the last
    segment's data) of the log that `fix` cuts; both measured as recovery sees them."""
    last = store.segments[-1]
    path = store.segment_path(last)
    fd = io.open_read(path)
    try:
        try:
            header = seg.read_full_header(io, fd, path, last)
        except CorruptionError:
            # What a file without a valid header held cannot be told (its name alone
            # promises nothing): count the valid records before it.
            return _end_before(io, store, fix), io.size(fd)
        tail = seg.scan_tail(io, fd, path, last, header.salt, header.previous_salt)
        end = tail.junk  # past the data, the seal and whatever torn bytes follow
        if later or tail.end > fix.offset:
            return tail.next_lsn - 1, end
        if tail.corrupt is None:
            return fix.lsn - 1, end
        # Past the damage: the valid batches that open refused because of it.
        head = fmt.parse_batch_header(io.pread(fd, fmt.BATCH_HEADER, tail.corrupt))
        assert head is not None
        scan = seg.Scan(io, fd, path, header.salt, tail.corrupt, head.first_lsn)
        while scan.end is None:
            scan.batches()
        return scan.next_lsn - 1, end
    finally:
        io.close(fd)


def _end_before(io: FileIO, store: Store, fix: Fix) -> int:
    """The highest LSN of a valid batch at or after the cut, in the segments before the
    last (whose header is damaged)."""
    segments = store.segments
    if len(segments) < 2 or segments[-2] < fix.segment:
        return fix.lsn - 1
    first = segments[-2]
    path = store.segment_path(first)
    fd = io.open_read(path)
    try:
        try:
            header = seg.read_full_header(io, fd, path, first)
        except CorruptionError:
            return fix.lsn - 1
        tail = seg.scan_tail(io, fd, path, first, header.salt, header.previous_salt)
        return max(tail.next_lsn - 1, fix.lsn - 1)
    finally:
        io.close(fd)


def _backup_dir(io: FileIO, where: str, backup: str | None) -> str:
    """Make the backup directory (durably: its entry in its parent)."""
    if backup is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        names = set(io.listdir(where))
        name, n = f"broken-{stamp}", 1
        while name in names:
            n += 1
            name = f"broken-{stamp}-{n}"
        backup = os.path.join(where, name)
    backup = os.path.abspath(backup)
    with contextlib.suppress(FileNotFoundError):
        if io.listdir(backup):
            raise WalError(f"the backup directory {backup} exists and is not empty")
    made = io.makedirs(backup)
    for parent in sorted({os.path.dirname(d) for d in [*made, backup]}):
        io.fsync_dir(parent)
    return backup


def _save(io: FileIO, where: str, target: str, plan: _Plan) -> None:
    """Put the files `plan` changes or removes into `target`, as they are, durably."""
    saved = set(io.listdir(target)) - {_NOTES}
    for path in plan.changed:
        name = _free(os.path.basename(path), saved)
        _copy(io, path, os.path.join(target, name))
    for path in plan.removed:
        name = _free(os.path.basename(path), saved)
        dst = os.path.join(target, name)
        try:
            io.link(path, dst)
        except OSError as exc:
            if exc.errno not in _LINKLESS:
                raise
            _copy(io, path, dst)
    notes = os.path.join(target, _NOTES)
    text = _notes(where, plan).encode()
    fd = io.open(notes, create=True)  # appended to by each fix of one repair
    try:
        io.pwritev(fd, [text], io.size(fd))
        io.fdatasync(fd)
    finally:
        io.close(fd)
    io.fsync_dir(target)


def _free(name: str, taken: set[str]) -> str:
    """`name`, or `name.2`, `name.3`... if a file of that name is in the backup already
    (an earlier fix of the same run saved a version of it)."""
    n, candidate = 1, name
    while candidate in taken:
        n += 1
        candidate = f"{name}.{n}"
    taken.add(candidate)
    return candidate


def _notes(where: str, plan: _Plan) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    files = [os.path.basename(p) for p in (*plan.changed, *plan.removed)]
    return (
        f"walasync repair of {where}, {when}\n"
        f"problem: {plan.problem}\n"
        f"action: {plan.action}\n"
        f"saved here as they were before: {', '.join(files)}\n"
        f"to undo: stop every writer and copy these files back into {where}\n\n"
    )


def _copy(io: FileIO, src: str, dst: str) -> None:
    """Copy `src` to a new file `dst` and fdatasync it (runs of zeros become holes)."""
    fd_in = io.open_read(src)
    try:
        fd_out = io.open(dst, create=True)
        try:
            io.truncate(fd_out, 0)
            size = io.size(fd_in)
            pos = 0
            while pos < size:
                chunk = io.pread(fd_in, min(_CHUNK, size - pos), pos)
                if not chunk:
                    break
                if chunk != _ZEROS[: len(chunk)]:
                    io.pwritev(fd_out, [chunk], pos)
                pos += len(chunk)
            io.truncate(fd_out, pos)
            io.fdatasync(fd_out)
        finally:
            io.close(fd_out)
    finally:
        io.close(fd_in)


def _apply(io: FileIO, store: Store, plan: _Plan) -> None:
    """Carry out `plan` on the locked `store`: commit in META, then let recovery finish."""
    fix, where = plan.fix, store.path
    store.segments = Store.open_readonly(io, where).segments  # as they are now
    meta = store.read_meta() if fix.kind != "meta" else None
    segments = store.segments
    if meta is None:
        meta = Meta(os.urandom(16), segments[0], segments[0])
    if fix.kind == "first_lsn":
        meta = meta.with_(first_lsn=fix.lsn)
    elif fix.kind == "cut":
        meta = meta.with_(
            cut=fix.lsn,
            cut_offset=fix.offset,
            cut_batch=b"",
            cuts=meta.cuts + 1,
            last_cut=fix.lsn,
        )
    _meta.write_meta(io, where, meta)  # the commit point
    sizes = [io.stat(store.segment_path(lsn))[0] for lsn in segments]
    last = store.recover(max([4096, *sizes]))  # room to write in the cut segment
    io.close(last.fd)

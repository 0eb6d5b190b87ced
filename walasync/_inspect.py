"""`describe`: what a log directory holds, at a glance (`walasync info`).

Cheap and read-only, like a read-only opening: each segment's header and the seal at its
end (two reads), and a scan of the last segment only, as recovery does. It takes no lock
and never writes, so it works beside a running writer. It checks no batch in sealed
segments: that is `verify`'s job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import _format as fmt
from . import _meta
from . import _segment as seg
from ._io import FileIO
from ._meta import Meta
from ._store import LOCK_NAME, Store
from .errors import CorruptionError, NotALogError, UnsupportedFormatError, map_os_error

__all__ = ("LogInfo", "SegmentState", "describe", "look")

_OWN = frozenset((LOCK_NAME, _meta.META_NAME, _meta.TMP_NAME, seg.SPARE_NAME, seg.RECYCLE_NAME))


@dataclass(frozen=True)
class SegmentState:
    """One segment file as `describe` found it.

    `state` is "active" (the last segment, the one written to), "sealed" (a later segment
    exists and its seal says so), "unsealed" (not the last, without a seal: written in
    format 1, or left by a writer killed while starting the next one), "truncated" (wholly
    below the log's first LSN: the next open deletes it) or "damaged" (its header is
    unreadable; `version` is then 0).
    """

    path: str
    first_lsn: int
    last_lsn: int  # first_lsn - 1 when it holds no record
    size: int  # bytes
    state: str
    version: int


@dataclass(frozen=True)
class LogInfo:
    """What `walasync.describe` found in a log directory."""

    path: str
    versions: tuple[int, ...]  # the format versions its segments are written in
    segments: tuple[SegmentState, ...]
    first_lsn: int
    last_lsn: int  # first_lsn - 1 when the log holds no record
    bytes: int  # the size of the log's own files (segments, META, LOCK, a spare)
    torn_tail: int  # bytes of a torn write after the last batch, which open cuts (0: none)
    locked: bool  # a writer holds the log's lock
    log_id: str  # from META, in hex ("" without META)
    pending_cut: int  # the first LSN an interrupted truncate_back removes (0: none)
    problems: tuple[str, ...]  # what it saw amiss on the way (`verify` checks everything)
    other_files: tuple[str, ...]  # names in the directory that are not walasync's

    @property
    def records(self) -> int:
        return self.last_lsn - self.first_lsn + 1


def look(io: FileIO, path: str | os.PathLike[str]) -> tuple[Store, Meta | None]:
    """A read-only catalogue of the log at `path` and its META (None if it has none).

    Raises:
        NotALogError: the directory holds no segment file and no META.
        CorruptionError: META is damaged (UnsupportedFormatError: of a newer version).
        WalError: the directory is missing or unreadable (the OSError is the cause).
    """
    where = os.fspath(path)
    try:
        store = Store.open_readonly(io, where)
        if not store.segments and _meta.META_NAME not in io.listdir(store.path):
            raise NotALogError(store.path, 0, "not a walasync log: no segment file, no META")
        return store, store.read_meta()
    except OSError as exc:
        raise map_os_error(exc, f"reading {where}") from exc


def describe(path: str | os.PathLike[str], *, io: FileIO | None = None) -> LogInfo:
    """Describe the log at `path` without changing it (blocking: from async code, run it
    in a thread). Damage it meets is listed in `problems`, not raised.

    Raises:
        NotALogError: the directory holds no walasync log.
        UnsupportedFormatError: a segment or META is of a format this walasync cannot read.
        WalError: the directory is missing or unreadable (the OSError is the cause).
    """
    io = io or FileIO()
    problems: list[str] = []
    try:
        store, meta = look(io, path)
    except UnsupportedFormatError:
        raise
    except NotALogError:
        raise
    except CorruptionError as exc:  # a damaged META: describe the segments all the same
        store, meta = Store.open_readonly(io, os.fspath(path)), None
        problems.append(str(exc))
    try:
        return _describe(io, store, meta, problems)
    except OSError as exc:
        raise map_os_error(exc, f"reading {store.path}") from exc


def _describe(io: FileIO, store: Store, meta: Meta | None, problems: list[str]) -> LogInfo:
    names = io.listdir(store.path)
    segments = store.segments
    first = meta.first_lsn if meta is not None else segments[0] if segments else 1
    states: list[SegmentState] = []
    torn = 0
    last_lsn = first - 1
    if not segments:
        problems.append("segment missing: the log has no segment files left")
    pending = meta.cut if meta is not None else 0
    # An interrupted truncate_back: open finishes it before anything else, so what lies
    # from its cut on (later segments, the tail of the one it cuts) is no problem.
    cutting = store.locate(pending) if pending and segments else len(segments)
    for i, lsn in enumerate(segments):
        path = store.segment_path(lsn)
        size, _ = io.stat(path)
        after = segments[i + 1] if i + 1 < len(segments) else None
        fd = io.open_read(path)
        try:
            try:
                header = seg.read_full_header(io, fd, path, lsn)
            except UnsupportedFormatError:
                raise
            except CorruptionError as exc:
                problems.append(str(exc))
                end = after - 1 if after is not None else lsn - 1
                states.append(SegmentState(path, lsn, end, size, "damaged", 0))
                continue
            version = fmt.segment_version(io.pread(fd, fmt.SEGMENT_HEADER, 0))
            if after is not None:
                seal = seg.read_seal(io, fd, header.salt)
                state = "sealed" if seal is not None else "unsealed"
                if after <= first:
                    state = "truncated"
                if seal is not None:
                    end = seal.next_lsn - 1
                else:  # no seal to tell (damaged, or it never got one): its data does
                    tail = seg.scan_tail(io, fd, path, lsn, header.salt, header.previous_salt)
                    end = tail.next_lsn - 1
                last_lsn = end
            else:
                tail = seg.scan_tail(io, fd, path, lsn, header.salt, header.previous_salt)
                state, end = "active", tail.next_lsn - 1
                if tail.sealed:
                    state = "sealed"
                if i < cutting:
                    torn = _judge(tail, path, problems)
                last_lsn = end
        finally:
            io.close(fd)
        states.append(SegmentState(path, lsn, end, size, state, version))
    if pending:
        last_lsn = pending - 1  # the cut's rewritten batch, in META, ends there
    if segments and segments[0] > first:
        problems.append(
            f"{store.segment_path(segments[0])}: offset 0: segment missing: records "
            f"{first} to {segments[0] - 1} are gone"
        )
    total = 0
    for name in names:
        if name in _OWN or seg.parse_name(name) is not None:
            try:
                total += io.stat(os.path.join(store.path, name))[0]
            except (FileNotFoundError, IsADirectoryError):  # gone meanwhile, or odd
                pass
    lock = os.path.join(store.path, LOCK_NAME)
    return LogInfo(
        path=store.path,
        versions=tuple(sorted({s.version for s in states if s.version})),
        segments=tuple(states),
        first_lsn=first,
        last_lsn=max(last_lsn, first - 1),
        bytes=total,
        torn_tail=torn,
        locked=LOCK_NAME in names and io.is_locked(lock),
        log_id=meta.log_id.hex() if meta is not None else "",
        pending_cut=pending,
        problems=tuple(problems),
        other_files=tuple(sorted(n for n in names if n not in _OWN and seg.parse_name(n) is None)),
    )


def _judge(tail: seg.Tail, path: str, problems: list[str]) -> int:
    """Note what is wrong at the end of the last segment; return the bytes of a torn
    write there (0: none)."""
    if tail.sealed:
        problems.append(
            f"{path}: offset {tail.end}: segment missing: this last segment is sealed, so "
            f"{seg.segment_name(tail.next_lsn)} existed"
        )
    elif tail.corrupt is not None:
        problems.append(
            f"{path}: offset {tail.end}: invalid bytes before a valid batch at offset "
            f"{tail.corrupt}: acknowledged records are missing"
        )
    elif tail.junk > tail.end:
        return tail.junk - tail.end
    return 0

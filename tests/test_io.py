"""The real I/O layer makes every durability call that the guarantees rest on.

The crash tests run on `walasync.testing.SimulatedDisk`, and a kill -9 keeps the page
cache, so neither can see a flush that the real `FileIO` forgets. Here real workloads run
on the real `walasync.FileIO` over real files, while a spy on the `os` module records,
in order and under a lock, every call that writes, flushes, creates, renames or removes
(with the flags of each write and open), and the test records an *ack* each time an
append, `append_many`, `sync()`, open or close returns. The history is then checked:

(0) every acknowledged record was written to a segment file before its ack (this also
    proves that the spy sees the writes: it cannot pass by going blind);
(a) every write to a segment file (`*.wal`) is durable before an ack that covers it: it
    was written with RWF_DSYNC (or to a file opened O_DSYNC), or an fdatasync or fsync of
    the same file (by any fd: identity is the inode) started after the write and ended
    before the ack;
(b) every segment name made (created, or renamed into place) before such an ack was
    followed, before the ack, by an os.fsync of its directory (an fd opened on it), one
    that started after the name was made;
(c) the same for each directory that opening the log created: its parent is fsynced
    before the first ack;
(d) in the relaxed modes only `sync()` and `close()` promise durability; they cover every
    write made before them (the workloads call them when no append is running);
(e) a segment appears under its final name only once its header is durable: at a rename
    into `*.wal`, nothing written to the file is still unsynced;
(f) in the fsync and interval modes, no segment may outlive a batch of the one before it:
    when a new segment's name appears, the older segments have nothing unsynced;
(g) an open makes what it recovered durable, whatever an earlier writer (perhaps killed)
    left unsynced: it fdatasyncs the last segment and fsyncs the log's directory.

What an ack covers. An append's ack covers what was written up to and including the
write of its record (the I/O thread may be rotating for a later batch while the loop
records the ack: that later segment is not this ack's business). `sync()`, `close()` and
an open cover everything before them; an open covers the writes to the last segment only
(it makes what it recovered durable; sealed segments that a `Durability.NONE` log never
synced are documented as not covered).

Exempt, with the reasons:
- Writes of zeros only: the zeros written ahead of the writer, and zero-filled
  preallocation where fallocate is missing. They go over blocks that read as zeros
  already (fallocated, or past the end of the file), so losing them changes nothing a
  reader or recovery sees. The premise is checked instead: a write of zeros never lands on
  bytes written non-zero before (it would be a zero over a record). These workloads shut
  down cleanly, so the one place where zeros must be durable (zeroing a torn tail on
  open) does not occur here; the crash tests cover it.
- `posix_fallocate` and `ftruncate` of the spare file: each durable write commits the
  metadata needed to read its own bytes back (file size, block allocation), so the
  spare's allocation needs no flush of its own for records to be safe.
- The LOCK file and `spare.tmp` names: a lost LOCK is recreated at open, and a spare is
  discarded by recovery; neither holds records.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import walasync
from walasync import FileIO

_DSYNC_FLAGS = getattr(os, "RWF_DSYNC", 0) | getattr(os, "RWF_SYNC", 0)
_TAG = re.compile(rb"<r(\d+)>")


@dataclass(frozen=True)
class Event:
    """One recorded call (at its end; syncs also at their start) or ack."""

    op: str  # open close write sync-start sync-end rename unlink mkdir fallocate truncate ack
    thread: str = ""
    path: str = ""  # the file (found from the fd) or the name operated on
    ino: int = 0
    call: str = ""  # the os function; for acks, what returned
    offset: int = 0
    size: int = 0
    durable: bool = False  # a write that is durable by itself (RWF_DSYNC, an O_DSYNC fd)
    zeros: bool = False  # a write of zero bytes only
    tags: frozenset[int] = frozenset()  # records (by tag) in a write, or acknowledged
    dst: str = ""  # rename target
    isdir: bool = False
    created: bool = False  # an open that created the file
    sync_id: int = 0  # pairs a sync's start and end
    scope: str = ""  # for acks: "durable", "open" (the last segment) or "written"

    def __str__(self) -> str:
        where = f"{os.path.basename(self.path)}" + (f" -> {self.dst}" if self.dst else "")
        extra = f" @{self.offset}+{self.size}" if self.op == "write" else ""
        return f"{self.call or self.op}({where}{extra}) on {self.thread}"


@dataclass
class _Fd:
    path: str
    ino: int
    isdir: bool
    sync_writes: bool  # opened O_DSYNC or O_SYNC


@dataclass(repr=False)
class Spy:
    """Records, in order, the file system calls made through the `os` module."""

    events: list[Event] = field(default_factory=list)
    mode: str = "fsync"  # the durability mode of the session under way
    sessions: list[tuple[int, str]] = field(default_factory=list)  # (event index, mode)
    # Sabotage, to prove the checker catches what it must (see the last test).
    drop_dsync_flag: bool = False
    skip_fdatasync: bool = False
    skip_dir_fsync: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _fds: dict[int, _Fd] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def _add(self, **kw: Any) -> None:
        ev = Event(thread=threading.current_thread().name, **kw)
        with self._lock:
            self.events.append(ev)

    def session(self, mode: str) -> None:
        """A log is about to be opened in `mode` (rule (f) depends on it)."""
        with self._lock:
            self.sessions.append((len(self.events), mode))

    def ack(self, what: str, scope: str, records: Iterable[bytes] = ()) -> None:
        """`what` returned: its records are acknowledged, durably (scope "durable") or
        only as written to the OS ("written")."""
        tags = frozenset(int(m) for r in records for m in _TAG.findall(r))
        self._add(op="ack", call=what, scope=scope, tags=tags)

    def opened(self, log_dir: Path) -> None:
        """`walasync.open(log_dir)` returned (after `session`)."""
        self._add(op="ack", call="open", scope="open", path=os.path.abspath(log_dir))

    def install(self, mp: pytest.MonkeyPatch) -> None:
        """Wrap the `os` functions (whatever is there now, blockbuster's guard included)."""
        Wrap = Callable[[str, Callable[..., Any]], Callable[..., Any]]
        wrappers: list[tuple[str, Wrap]] = [
            ("open", self._open),
            ("close", self._close),
            ("pwritev", self._pwritev),
            ("pwrite", self._pwrite),
            ("write", self._write),
            ("writev", self._writev),
            ("fdatasync", self._sync),
            ("fsync", self._sync),
            ("rename", self._rename),
            ("replace", self._rename),
            ("unlink", self._unlink),
            ("remove", self._unlink),
            ("mkdir", self._mkdir),
            ("posix_fallocate", self._fd_op),
            ("ftruncate", self._fd_op),
        ]
        for name, make in wrappers:
            if hasattr(os, name):
                mp.setattr(os, name, make(name, getattr(os, name)))

    # The wrappers. Each is made for one os function; `fn` is what it replaces.

    def _open(self, name: str, fn: Callable[..., int]) -> Callable[..., int]:
        def spy_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
            full = self._path(path, kw.get("dir_fd"))
            existed = os.path.lexists(full)
            fd = fn(path, flags, mode, **kw)
            st = os.fstat(fd)
            isdir = stat.S_ISDIR(st.st_mode)
            info = _Fd(full, st.st_ino, isdir, bool(flags & os.O_DSYNC))
            with self._lock:
                self._fds[fd] = info
            created = bool(flags & os.O_CREAT) and not existed
            self._add(op="open", call=name, path=full, ino=st.st_ino, isdir=isdir, created=created)
            return fd

        return spy_open

    def _close(self, name: str, fn: Callable[[int], None]) -> Callable[[int], None]:
        def spy_close(fd: int) -> None:
            # Forget the fd before it is closed: once closed, another thread may get it.
            with self._lock:
                info = self._fds.pop(fd, None)
            if info is not None:
                self._add(op="close", call=name, path=info.path, ino=info.ino)
            fn(fd)

        return spy_close

    def _written(self, name: str, fd: int, data: bytes, offset: int, dsync: bool) -> None:
        info = self._fds.get(fd)
        if info is None:  # not a file opened through os.open (a pipe, say)
            return
        self._add(
            op="write",
            call=name,
            path=info.path,
            ino=info.ino,
            offset=offset,
            size=len(data),
            durable=dsync or info.sync_writes,
            zeros=not data.strip(b"\0"),
            tags=frozenset(int(m) for m in _TAG.findall(data)),
        )

    def _pwritev(self, name: str, fn: Callable[..., int]) -> Callable[..., int]:
        def spy_pwritev(fd: int, buffers: Iterable[Any], offset: int, flags: int = 0) -> int:
            buffers = [bytes(b) for b in buffers]
            if self.drop_dsync_flag:
                flags &= ~_DSYNC_FLAGS
            n = fn(fd, buffers, offset, flags)
            self._written(name, fd, b"".join(buffers)[:n], offset, bool(flags & _DSYNC_FLAGS))
            return n

        return spy_pwritev

    def _pwrite(self, name: str, fn: Callable[..., int]) -> Callable[..., int]:
        def spy_pwrite(fd: int, data: Any, offset: int, *flags: int) -> int:
            n = fn(fd, data, offset, *flags)
            dsync = bool(flags and flags[0] & _DSYNC_FLAGS)
            self._written(name, fd, bytes(data)[:n], offset, dsync)
            return n

        return spy_pwrite

    def _write(self, name: str, fn: Callable[..., int]) -> Callable[..., int]:
        def spy_write(fd: int, data: Any) -> int:
            n = fn(fd, data)
            if fd in self._fds:
                self._written(name, fd, bytes(data)[:n], os.lseek(fd, 0, os.SEEK_CUR) - n, False)
            return n

        return spy_write

    def _writev(self, name: str, fn: Callable[..., int]) -> Callable[..., int]:
        def spy_writev(fd: int, buffers: Iterable[Any]) -> int:
            buffers = [bytes(b) for b in buffers]
            n = fn(fd, buffers)
            if fd in self._fds:
                data = b"".join(buffers)[:n]
                self._written(name, fd, data, os.lseek(fd, 0, os.SEEK_CUR) - n, False)
            return n

        return spy_writev

    def _sync(self, name: str, fn: Callable[[Any], None]) -> Callable[[Any], None]:
        def spy_sync(fd: Any) -> None:
            fd = fd if isinstance(fd, int) else fd.fileno()
            info = self._fds.get(fd)
            if info is None:
                fn(fd)
                return
            if (name == "fdatasync" and self.skip_fdatasync) or (
                info.isdir and self.skip_dir_fsync
            ):
                return
            sync_id = next(self._ids)
            common = {"call": name, "path": info.path, "ino": info.ino, "isdir": info.isdir}
            self._add(op="sync-start", sync_id=sync_id, **common)
            fn(fd)
            self._add(op="sync-end", sync_id=sync_id, **common)

        return spy_sync

    def _rename(self, name: str, fn: Callable[..., None]) -> Callable[..., None]:
        def spy_rename(src: Any, dst: Any, **kw: Any) -> None:
            full_src = self._path(src, kw.get("src_dir_fd"))
            full_dst = self._path(dst, kw.get("dst_dir_fd"))
            fn(src, dst, **kw)
            ino = os.lstat(full_dst).st_ino
            self._add(op="rename", call=name, path=full_src, dst=full_dst, ino=ino)

        return spy_rename

    def _unlink(self, name: str, fn: Callable[..., None]) -> Callable[..., None]:
        def spy_unlink(path: Any, **kw: Any) -> None:
            full = self._path(path, kw.get("dir_fd"))
            try:
                ino = os.lstat(full).st_ino
            except OSError:
                ino = 0
            fn(path, **kw)
            self._add(op="unlink", call=name, path=full, ino=ino)

        return spy_unlink

    def _mkdir(self, name: str, fn: Callable[..., None]) -> Callable[..., None]:
        def spy_mkdir(path: Any, *args: Any, **kw: Any) -> None:
            full = self._path(path, kw.get("dir_fd"))
            fn(path, *args, **kw)
            self._add(op="mkdir", call=name, path=full, isdir=True)

        return spy_mkdir

    def _fd_op(self, name: str, fn: Callable[..., None]) -> Callable[..., None]:
        def spy_fd_op(fd: int, *args: int) -> None:
            fn(fd, *args)
            info = self._fds.get(fd)
            if info is not None:
                op = "truncate" if name == "ftruncate" else "fallocate"
                size = args[0] if op == "truncate" else args[0] + args[1]
                self._add(op=op, call=name, path=info.path, ino=info.ino, size=size)

        return spy_fd_op

    def _path(self, path: Any, dir_fd: int | None) -> str:
        name: str = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(name):
            name = os.path.join(self._fds[dir_fd].path, name)
        return os.path.normpath(os.path.abspath(name))


def _is_segment(path: str) -> bool:
    return path.endswith(".wal")


def opening_problems(i: int, log: str, during: list[Event], segs: dict[str, int]) -> list[str]:
    """Rule (g): an open makes what it recovered durable whatever an earlier writer left
    (killed between a write and its fdatasync, or a rename and the directory's fsync):
    an fdatasync of the last segment and an fsync of the log's directory, during the open."""
    problems = []
    if not segs:
        return [f"(g) open #{i} of {log}: no segment"]
    last = max(segs)
    if not any(ev.op == "sync-end" and not ev.isdir and ev.ino == segs[last] for ev in during):
        problems.append(f"(g) open #{i} of {log}: no fdatasync of {os.path.basename(last)}")
    if not any(ev.op == "sync-end" and ev.isdir and ev.path == log for ev in during):
        problems.append(f"(g) open #{i} of {log}: no fsync of the directory")
    return problems


def check(spy: Spy, log_dirs: Iterable[Path]) -> list[str]:
    """Replay the history and return every broken rule (empty if none)."""
    logs = {os.path.normpath(os.path.abspath(d)) for d in log_dirs}
    # A directory entry matters if it is a segment of a log, a log directory, or a
    # directory on the way to one (made when the log was opened).
    ancestors = {a for d in logs for a in Path(d).parents} | {Path(d) for d in logs}
    ancestor_paths = {os.fspath(a) for a in ancestors}

    def entry_matters(path: str) -> bool:
        return (_is_segment(path) and os.path.dirname(path) in logs) or path in ancestor_paths

    problems: list[str] = []
    names: dict[str, int] = {}  # path -> inode, for files in the log directories
    unsynced: dict[int, dict[int, Event]] = {}  # inode -> {event index: write}
    unsynced_names: dict[str, dict[str, int]] = {}  # directory -> {path: index it was made}
    data: dict[int, list[tuple[int, int]]] = {}  # inode -> non-zero byte ranges written
    written: dict[int, tuple[int, int]] = {}  # record tag -> (index of its write, inode)
    in_sync: dict[int, set[int] | set[str]] = {}  # sync id -> what it covers
    mode = "fsync"
    sessions = dict(spy.sessions)

    def made_name(path: str, i: int) -> None:
        unsynced_names.setdefault(os.path.dirname(path), {})[path] = i

    def removed_name(path: str) -> None:
        unsynced_names.get(os.path.dirname(path), {}).pop(path, None)
        names.pop(path, None)

    def segments(directory: str) -> dict[str, int]:
        return {
            p: ino for p, ino in names.items() if _is_segment(p) and os.path.dirname(p) == directory
        }

    for i, ev in enumerate(spy.events):
        mode = sessions.get(i, mode)
        if ev.op == "open" and not ev.isdir:
            if ev.created and _is_segment(ev.path):
                made_name(ev.path, i)
            names[ev.path] = ev.ino
        elif ev.op == "mkdir":
            made_name(ev.path, i)
        elif ev.op == "rename":
            removed_name(ev.path)
            names[ev.dst] = ev.ino
            made_name(ev.dst, i)
            if _is_segment(ev.dst):
                problems += [
                    f"(e) {ev} at #{i}: {w} is not durable yet"
                    for w in unsynced.get(ev.ino, {}).values()
                ]
                if mode != "none":
                    problems += [
                        f"(f) {ev} at #{i}: older {w} is not durable"
                        for p, ino in segments(os.path.dirname(ev.dst)).items()
                        if p != ev.dst
                        for w in unsynced.get(ino, {}).values()
                    ]
        elif ev.op == "unlink":
            removed_name(ev.path)
            if ev.ino not in names.values():
                unsynced.pop(ev.ino, None)
                data.pop(ev.ino, None)
        elif ev.op == "truncate":
            data[ev.ino] = [
                (lo, min(hi, ev.size)) for lo, hi in data.get(ev.ino, []) if lo < ev.size
            ]
        elif ev.op == "write":
            end = ev.offset + ev.size
            if ev.zeros:
                for lo, hi in data.get(ev.ino, []):
                    if lo < end and ev.offset < hi:
                        problems.append(f"zeros over data: {ev} at #{i} overlaps [{lo}, {hi})")
                continue
            data.setdefault(ev.ino, []).append((ev.offset, end))
            for tag in ev.tags:
                written[tag] = (i, ev.ino)
            if not ev.durable:
                unsynced.setdefault(ev.ino, {})[i] = ev
        elif ev.op == "sync-start":
            if ev.isdir:
                if ev.call == "fsync":  # fdatasync of a directory is not enough everywhere
                    in_sync[ev.sync_id] = set(unsynced_names.get(ev.path, {}))
            else:
                in_sync[ev.sync_id] = set(unsynced.get(ev.ino, {}))
        elif ev.op == "sync-end" and ev.sync_id in in_sync:
            covered = in_sync.pop(ev.sync_id)
            pending: dict[Any, Any] = (
                unsynced_names.get(ev.path, {}) if ev.isdir else unsynced.get(ev.ino, {})
            )
            for key in covered:
                pending.pop(key, None)
        elif ev.op == "ack":
            cutoff = i
            for tag in sorted(ev.tags):
                if tag not in written:
                    problems.append(f"(0) ack #{i} ({ev.call}): record <r{tag}> never written")
                    continue
                ino = written[tag][1]
                if not any(_is_segment(p) and n == ino for p, n in names.items()):
                    problems.append(f"(0) ack #{i} ({ev.call}): <r{tag}> is not in a segment")
            if ev.tags:
                cutoff = max((written[t][0] for t in ev.tags if t in written), default=i)
            if ev.scope == "written":
                continue
            if ev.scope == "open":
                start = max((s for s in sessions if s <= i), default=0)
                problems += opening_problems(i, ev.path, spy.events[start:i], segments(ev.path))
            for log in sorted(logs):
                segs = segments(log)
                if ev.scope == "open":
                    if log != ev.path or not segs:
                        continue
                    last = max(segs)
                    segs = {last: segs[last]}
                for p, ino in sorted(segs.items()):
                    for j, w in unsynced.get(ino, {}).items():
                        if j <= cutoff:
                            problems.append(
                                f"(a) ack #{i} ({ev.call}): {w} at #{j} is not durable "
                                f"({os.path.basename(p)})"
                            )
            for directory, made in unsynced_names.items():
                for p, j in made.items():
                    if j <= cutoff and entry_matters(p):
                        rule = "(c)" if p in ancestor_paths else "(b)"
                        problems.append(
                            f"{rule} ack #{i} ({ev.call}): the name {p} (made at #{j}) is not "
                            f"durable: no fsync of {directory} after it"
                        )
    return problems


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Spy:
    """A spy installed once `tmp_path` exists (the test's own directories are not the
    library's business)."""
    s = Spy()
    s.install(monkeypatch)
    return s


class Records:
    """Records that carry a unique tag, so that the history can tell where each went."""

    def __init__(self) -> None:
        self._n = itertools.count()

    def __call__(self, size: int) -> bytes:
        tag = b"<r%d>" % next(self._n)
        return tag + b"." * max(0, size - len(tag))


def assert_rules(spy: Spy, *log_dirs: Path) -> None:
    problems = check(spy, log_dirs)
    assert not problems, f"{len(problems)} broken rules, the first ones:\n" + "\n".join(
        problems[:15]
    )


def count(spy: Spy, op: str, pred: Callable[[Event], bool] = lambda ev: True) -> int:
    return sum(1 for ev in spy.events if ev.op == op and pred(ev))


async def read_all(wal: walasync.Wal) -> list[bytes]:
    return [r.data async for r in wal.read()]


async def fsync_workload(spy: Spy, log_dir: Path) -> list[bytes]:
    """Concurrent appends and append_many across many segments, one record larger than a
    segment, sync, close, reopen, more appends. Returns every record acknowledged."""
    record = Records()
    acked: dict[int, bytes] = {}
    spy.session("fsync")
    async with walasync.open(log_dir, io=FileIO(), segment_size=4096) as wal:
        spy.opened(log_dir)

        async def appender(n: int) -> None:
            for i in range(12):
                if i % 4 == 3:
                    unit = [record(40 + 90 * k + n) for k in range(3)]
                    lsns = await wal.append_many(unit)
                    spy.ack("append_many", "durable", unit)
                    acked.update(zip(lsns, unit, strict=True))
                else:
                    data = record(60 + (n * 97 + i * 131) % 1400)
                    lsn = await wal.append(data)
                    spy.ack("append", "durable", [data])
                    acked[lsn] = data

        await asyncio.gather(*(appender(n) for n in range(16)))
        for _ in range(10):  # two per segment: five rotations whatever the batching
            data = record(1500)
            acked[await wal.append(data)] = data
            spy.ack("append", "durable", [data])
        big = record(6000)  # larger than a segment: it gets a segment of its own
        acked[await wal.append(big)] = big
        spy.ack("append", "durable", [big])
        await wal.sync()
        spy.ack("sync", "durable")
    spy.ack("close", "durable")

    spy.session("fsync")
    async with walasync.open(log_dir, io=FileIO(), segment_size=4096) as wal:
        spy.opened(log_dir)
        for _ in range(3):
            data = record(3000)  # a rotation each
            acked[await wal.append(data)] = data
            spy.ack("append", "durable", [data])
        assert await read_all(wal) == [acked[lsn] for lsn in sorted(acked)]
    spy.ack("close", "durable")
    return [acked[lsn] for lsn in sorted(acked)]


async def test_fsync_mode_makes_every_acknowledged_write_durable(spy: Spy, tmp_path: Path) -> None:
    log_dir = tmp_path / "a" / "b" / "log"  # opening it makes three directories
    records = await fsync_workload(spy, log_dir)
    assert_rules(spy, log_dir)
    # The workload did what the rules need to mean something.
    assert count(spy, "mkdir") == 3
    assert count(spy, "rename", lambda ev: _is_segment(ev.dst)) >= 10  # rotations
    assert count(spy, "sync-end", lambda ev: ev.isdir) > 0
    async with walasync.open(log_dir) as wal:
        assert await read_all(wal) == records


async def test_interval_mode_sync_and_close_cover_every_write(spy: Spy, tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    record = Records()
    opts: dict[str, Any] = {"durability": "interval", "sync_interval": 60, "segment_size": 8192}
    expected: list[bytes] = []
    spy.session("interval")
    async with walasync.open(log_dir, io=FileIO(), **opts) as wal:
        spy.opened(log_dir)

        async def appender(n: int) -> None:
            for i in range(8):
                data = record(100 + (n * 53 + i * 211) % 900)
                await wal.append(data)
                spy.ack("append", "written", [data])  # written, not yet durable

        for _ in range(3):
            await asyncio.gather(*(appender(n) for n in range(8)))
            unit = [record(300) for _ in range(4)]
            await wal.append_many(unit)
            spy.ack("append_many", "written", unit)
            await wal.sync()
            spy.ack("sync", "durable")
        await wal.append(record(500))  # left for close to sync
        expected = await read_all(wal)
    spy.ack("close", "durable")
    assert_rules(spy, log_dir)
    assert count(spy, "rename", lambda ev: _is_segment(ev.dst)) >= 5
    assert count(spy, "write", lambda ev: not ev.durable and bool(ev.tags)) > 0
    async with walasync.open(log_dir) as wal:
        assert await read_all(wal) == expected


async def test_none_mode_sync_covers_every_write_and_open_syncs_the_last_segment(
    spy: Spy, tmp_path: Path
) -> None:
    record = Records()
    log_dir = tmp_path / "log"
    opts: dict[str, Any] = {"durability": "none", "segment_size": 4096}
    spy.session("none")
    async with walasync.open(log_dir, io=FileIO(), **opts) as wal:
        spy.opened(log_dir)
        for _ in range(3):
            for _ in range(10):  # about 2.5 segments: sealed ones are synced by sync() too
                data = record(1000)
                await wal.append(data)
                spy.ack("append", "written", [data])
            await wal.sync()
            spy.ack("sync", "durable")
    # A log closed in NONE mode without sync(): opening it must make the last segment
    # durable before reporting its records (as `last_lsn`) or building on them.
    second = tmp_path / "second"
    spy.session("none")
    async with walasync.open(second, io=FileIO(), **opts) as wal:
        for _ in range(5):
            await wal.append(record(100))  # stays in the first segment
    spy.session("fsync")
    async with walasync.open(second, io=FileIO(), segment_size=4096) as wal:
        spy.opened(second)
        assert wal.last_lsn == 5
    assert_rules(spy, log_dir, second)
    assert count(spy, "rename", lambda ev: _is_segment(ev.dst)) >= 6


async def test_zeros_written_ahead_never_land_on_records(spy: Spy, tmp_path: Path) -> None:
    """With segments large enough for zeroing ahead, and pauses for it to start, the rules
    hold and no zero lands on a record (whether any zeros are written is up to timing)."""
    log_dir = tmp_path / "log"
    record = Records()
    spy.session("fsync")
    async with walasync.open(log_dir, io=FileIO(), segment_size=1 << 20) as wal:
        spy.opened(log_dir)
        for _ in range(6):
            for size in (200, 5000, 40_000):
                data = record(size)
                await wal.append(data)
                spy.ack("append", "durable", [data])
            await asyncio.sleep(0.06)  # calm: the zeroing may run
    spy.ack("close", "durable")
    assert_rules(spy, log_dir)


@pytest.mark.parametrize(
    ("sabotage", "rules"),
    [
        ("drop_dsync_flag", {"(a)"}),
        ("skip_fdatasync", {"(a)", "(e)"}),
        ("skip_dir_fsync", {"(b)", "(c)"}),
    ],
)
async def test_the_checker_catches_a_missing_durability_call(
    spy: Spy, tmp_path: Path, sabotage: str, rules: set[str]
) -> None:
    """Drop one kind of durability call below FileIO (as a broken FileIO would): the
    rules must see it. Proves the checker is not blind to what it is there to catch."""
    if sabotage == "drop_dsync_flag" and not _DSYNC_FLAGS:
        pytest.skip("no RWF_DSYNC on this platform: FileIO writes, then fdatasyncs")
    setattr(spy, sabotage, True)
    log_dir = tmp_path / "a" / "log"
    if sabotage == "skip_fdatasync":  # no fdatasync: the relaxed modes show it best
        record = Records()
        spy.session("interval")
        async with walasync.open(
            log_dir, io=FileIO(), durability="interval", sync_interval=60, segment_size=4096
        ) as wal:
            for _ in range(10):
                await wal.append(record(1000))
            await wal.sync()
            spy.ack("sync", "durable")
    else:
        await fsync_workload(spy, log_dir)
    problems = check(spy, [log_dir])
    assert {p.split()[0] for p in problems} >= rules, problems[:10]

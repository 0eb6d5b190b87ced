"""Crash and fault testing: `SimulatedDisk`, an in-memory file system that knows what is durable.

Pass one to `walasync.open(path, io=disk)`. Like LevelDB's fault-injection env and SQLite's
crash-test VFS, it keeps apart what is durable and what a power loss would lose:

- a file's contents (and size) become durable at a completed `fdatasync` of it, through
  any file descriptor; `write_durable` is a `pwritev` then an `fdatasync`;
- a directory entry (a created, renamed or removed file, or a directory made by
  `makedirs`) becomes durable at `fsync_dir` of the directory that holds it.

`crash()` returns a new disk holding what a power loss at that instant could leave, so a
test can recover from it with the real code. `on_step` is called before each mutating call,
so a test can take `crash()` "before step k" for every k of a workload; `fail_at`,
`short_write` and `slow` script I/O errors, short writes and slow calls.

    disk = SimulatedDisk.from_files({}, dirs=["/data"])
    async with walasync.open("/data/log", io=disk) as wal:
        await wal.append(b"x")
    async with walasync.open("/data/log", io=disk.crash()) as wal:
        assert wal.last_lsn == 1

Paths are absolute POSIX paths; no real file is touched.
"""

from __future__ import annotations

import errno
import os
import posixpath
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ._io import FileIO

__all__ = ("SimulatedDisk",)

SECTOR = 512
_MODES = ("drop", "prefix", "torn", "reorder", "process")
_OPS = frozenset(
    ("open", "write", "fdatasync", "fsync_dir", "truncate", "rename", "unlink", "link", "makedirs")
)

# An unsynced change to a file: (offset, data) for a write, (new size, None) for a truncate.
_Change = tuple[int, bytes | None]


class _File:
    """A file's inode: its current contents, its durable contents and the changes between."""

    __slots__ = ("data", "durable", "locker", "mtime", "pending")

    def __init__(self, data: bytes | bytearray = b"") -> None:
        self.mtime = time.time()
        self.data = bytearray(data)
        self.durable = bytes(data)
        self.pending: list[_Change] = []
        self.locker: int | None = None  # fd holding the lock


class _Dir:
    """A directory's inode: its current entries and those as of its last fsync."""

    __slots__ = ("durable", "entries")

    def __init__(self) -> None:
        self.entries: dict[str, _File | _Dir] = {}
        self.durable: dict[str, _File | _Dir] = {}


@dataclass
class _Fd:
    node: _File
    writable: bool


@dataclass
class _Fault:
    op: str
    at: int  # the value of the op's call counter at which it fires
    errno: int
    keep: int | None = None  # short write: bytes kept before failing


def _err(code: int, path: str = "") -> OSError:
    """An OSError of the right subclass (FileNotFoundError for ENOENT, ...)."""
    return OSError(code, os.strerror(code), path) if path else OSError(code, os.strerror(code))


def _parts(path: str) -> list[str]:
    norm = posixpath.normpath(posixpath.join("/", os.fspath(path)))
    return [p for p in norm.split("/") if p]


def _apply(buf: bytearray, change: _Change) -> None:
    pos, data = change
    if data is None:
        del buf[pos:]
        buf.extend(bytes(pos - len(buf)))
        return
    if pos > len(buf):
        buf.extend(bytes(pos - len(buf)))
    buf[pos : pos + len(data)] = data


def _replay(base: bytes, changes: Iterable[_Change]) -> bytearray:
    buf = bytearray(base)
    for change in changes:
        _apply(buf, change)
    return buf


class SimulatedDisk(FileIO):
    """An in-memory file system with a model of durability, for crash and fault tests.

    A new disk holds only the root directory; `from_files` makes one that holds durable
    files and directories. Every call of a mutating method (`open` with `create`, `pwritev`,
    `zero_fill`, `fdatasync`, `fsync_dir`, `truncate`, `rename`, `unlink`, `link`,
    `makedirs`; `write_durable` is two: a write and an fdatasync), whether or not it changes
    anything, adds one to `steps` and then calls `on_step(steps, op)` before it takes
    effect, with op one of "open", "write", "fdatasync", "fsync_dir", "truncate", "rename",
    "unlink", "link", "makedirs". The hook runs on the calling thread, under the disk's
    lock, so `crash()` inside it sees exactly the state before the step.

    Thread-safe: walasync calls it from its I/O thread, its preallocation thread and the
    loop's default executor.
    """

    SECTOR = SECTOR

    def __init__(self) -> None:
        self._mutex = threading.RLock()
        self._root = _Dir()
        self._fds: dict[int, _Fd] = {}
        self._next_fd = 3
        self._calls: dict[str, int] = dict.fromkeys(_OPS, 0)
        self._faults: list[_Fault] = []
        self._delays: dict[str, float] = {}
        self.steps = 0
        self.on_step: Callable[[int, str], object] | None = None

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], dirs: Iterable[str] = ()) -> SimulatedDisk:
        """A disk holding `files` (path: contents) and `dirs`, with parents, all durable."""
        disk = cls()
        for path in dirs:
            disk._durable_dir(_parts(path))
        for path, data in files.items():
            *parent, name = _parts(path)
            node = _File(data)
            d = disk._durable_dir(parent)
            d.entries[name] = d.durable[name] = node
        return disk

    def _durable_dir(self, parts: list[str]) -> _Dir:
        d = self._root
        for name in parts:
            child = d.entries.get(name)
            if not isinstance(child, _Dir):
                child = _Dir()
                d.entries[name] = d.durable[name] = child
            d = child
        return d

    # -- scripted faults ---------------------------------------------------------------

    def fail_at(self, op: str, nth: int, errno: int) -> None:
        """Make the `nth` call of `op` from now on (1-based) raise OSError(errno), with no
        effect. "write" counts `pwritev` and `zero_fill` calls (and the write of
        `write_durable`), "fdatasync" every fdatasync; "open" counts every `open` call."""
        if op not in _OPS:
            raise ValueError(f"unknown op {op!r}; one of {sorted(_OPS)}")
        if nth < 1:
            raise ValueError("nth counts from 1")
        with self._mutex:
            self._faults.append(_Fault(op, self._calls[op] + nth, errno))

    def short_write(self, nth: int, nbytes: int) -> None:
        """Make the `nth` write from now on keep only its first `nbytes` bytes, then raise
        OSError(EIO), as a write that ran out of room or hit a bad sector half way would.
        (`FileIO.pwritev` resumes after short writes, so a failing short write raises.)"""
        if nth < 1 or nbytes < 0:
            raise ValueError("nth counts from 1 and nbytes must be >= 0")
        with self._mutex:
            self._faults.append(_Fault("write", self._calls["write"] + nth, errno.EIO, nbytes))

    def slow(self, op: str, seconds: float) -> None:
        """Sleep `seconds` before each call of `op` (0 stops it), outside the disk's lock."""
        if op not in _OPS:
            raise ValueError(f"unknown op {op!r}; one of {sorted(_OPS)}")
        with self._mutex:
            self._delays[op] = seconds

    def _begin(self, op: str, step: bool = True) -> _Fault | None:
        """Count a call of `op` (under the lock): the step hook, then its fault if due."""
        if step:
            self.steps += 1
            if self.on_step is not None:
                self.on_step(self.steps, op)
        self._calls[op] += 1
        for fault in self._faults:
            if fault.op == op and fault.at == self._calls[op]:
                self._faults.remove(fault)
                if fault.keep is None:
                    raise _err(fault.errno)
                return fault
        return None

    def _delay(self, op: str) -> None:
        seconds = self._delays.get(op)
        if seconds:
            time.sleep(seconds)

    # -- lookups (under the lock) --------------------------------------------------------

    def _lookup(self, path: str) -> _File | _Dir:
        node: _File | _Dir = self._root
        for name in _parts(path):
            if not isinstance(node, _Dir):
                raise _err(errno.ENOTDIR, path)
            child = node.entries.get(name)
            if child is None:
                raise _err(errno.ENOENT, path)
            node = child
        return node

    def _dir(self, path: str) -> _Dir:
        node = self._lookup(path)
        if not isinstance(node, _Dir):
            raise _err(errno.ENOTDIR, path)
        return node

    def _parent(self, path: str) -> tuple[_Dir, str]:
        parts = _parts(path)
        if not parts:
            raise _err(errno.EBUSY, path)
        return self._dir("/" + "/".join(parts[:-1])), parts[-1]

    def _fd(self, fd: int, write: bool = False) -> _File:
        handle = self._fds.get(fd)
        if handle is None or (write and not handle.writable):
            raise _err(errno.EBADF)
        return handle.node

    def _new_fd(self, node: _File, writable: bool) -> int:
        fd = self._next_fd
        self._next_fd += 1
        self._fds[fd] = _Fd(node, writable)
        return fd

    # -- FileIO ----------------------------------------------------------------------------

    def open(self, path: str, *, create: bool = False) -> int:
        self._delay("open")
        with self._mutex:
            self._begin("open", step=create)
            parent, name = self._parent(path)
            node = parent.entries.get(name)
            if node is None:
                if not create:
                    raise _err(errno.ENOENT, path)
                node = parent.entries[name] = _File()
            if isinstance(node, _Dir):
                raise _err(errno.EISDIR, path)
            return self._new_fd(node, True)

    def open_read(self, path: str) -> int:
        with self._mutex:
            node = self._lookup(path)
            if isinstance(node, _Dir):
                raise _err(errno.EISDIR, path)
            return self._new_fd(node, False)

    def close(self, fd: int) -> None:
        with self._mutex:
            handle = self._fds.pop(fd, None)
            if handle is None:
                raise _err(errno.EBADF)
            if handle.node.locker == fd:
                handle.node.locker = None

    def pwritev(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
        self._write(fd, b"".join(buffers), offset)

    def write_durable(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
        self.pwritev(fd, buffers, offset)
        self.fdatasync(fd)

    def zero_fill(self, fd: int, start: int, end: int) -> None:
        if end > start:
            self._write(fd, bytes(end - start), start)

    def preallocate(self, fd: int, size: int) -> None:
        """Modelled as writing zeros: durable at the next fdatasync, like fallocate."""
        self.zero_fill(fd, self.size(fd), size)

    def _write(self, fd: int, data: bytes, offset: int) -> None:
        self._delay("write")
        with self._mutex:
            node = self._fd(fd, write=True)
            fault = self._begin("write")
            if fault is not None:
                data = data[: fault.keep]
            _apply(node.data, (offset, data))
            node.pending.append((offset, data))
            node.mtime = time.time()
            if fault is not None:
                raise _err(fault.errno)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        with self._mutex:
            return bytes(self._fd(fd).data[offset : offset + size])

    def size(self, fd: int) -> int:
        with self._mutex:
            return len(self._fd(fd).data)

    def stat(self, path: str) -> tuple[int, float]:
        with self._mutex:
            node = self._lookup(path)
            if not isinstance(node, _File):
                raise _err(errno.EISDIR, path)
            return len(node.data), node.mtime

    def fdatasync(self, fd: int) -> None:
        self._delay("fdatasync")
        with self._mutex:
            node = self._fd(fd)
            self._begin("fdatasync")
            node.durable = bytes(node.data)
            node.pending.clear()

    def fsync_dir(self, path: str) -> None:
        self._delay("fsync_dir")
        with self._mutex:
            self._begin("fsync_dir")
            d = self._dir(path)
            d.durable = dict(d.entries)

    def truncate(self, fd: int, size: int) -> None:
        self._delay("truncate")
        with self._mutex:
            node = self._fd(fd, write=True)
            self._begin("truncate")
            _apply(node.data, (size, None))
            node.pending.append((size, None))

    def rename(self, src: str, dst: str) -> None:
        self._delay("rename")
        with self._mutex:
            self._begin("rename")
            sdir, sname = self._parent(src)
            node = sdir.entries.get(sname)
            if node is None:
                raise _err(errno.ENOENT, src)
            ddir, dname = self._parent(dst)
            old = ddir.entries.get(dname)
            if old is node:
                return
            if isinstance(old, _Dir):
                raise _err(errno.EISDIR if isinstance(node, _File) else errno.ENOTEMPTY, dst)
            if old is not None and isinstance(node, _Dir):
                raise _err(errno.ENOTDIR, dst)
            del sdir.entries[sname]
            ddir.entries[dname] = node

    def unlink(self, path: str) -> None:
        self._delay("unlink")
        with self._mutex:
            self._begin("unlink")
            parent, name = self._parent(path)
            node = parent.entries.get(name)
            if node is None:
                raise _err(errno.ENOENT, path)
            if isinstance(node, _Dir):
                raise _err(errno.EISDIR, path)
            del parent.entries[name]

    def link(self, src: str, dst: str) -> None:
        self._delay("link")
        with self._mutex:
            self._begin("link")
            node = self._lookup(src)
            if isinstance(node, _Dir):
                raise _err(errno.EPERM, src)
            parent, name = self._parent(dst)
            if name in parent.entries:
                raise _err(errno.EEXIST, dst)
            parent.entries[name] = node

    def listdir(self, path: str) -> list[str]:
        with self._mutex:
            return list(self._dir(path).entries)

    def makedirs(self, path: str) -> list[str]:
        self._delay("makedirs")
        with self._mutex:
            self._begin("makedirs")
            d: _Dir = self._root
            created: list[str] = []
            parts = _parts(path)
            for i, name in enumerate(parts, 1):
                child = d.entries.get(name)
                if child is None:
                    child = d.entries[name] = _Dir()
                    created.append("/" + "/".join(parts[:i]))
                elif isinstance(child, _File):
                    raise _err(errno.EEXIST if i == len(parts) else errno.ENOTDIR, path)
                d = child
            return created

    def lock(self, fd: int) -> None:
        with self._mutex:
            node = self._fd(fd)
            if node.locker is not None and node.locker != fd:
                raise BlockingIOError(errno.EWOULDBLOCK, os.strerror(errno.EWOULDBLOCK))
            node.locker = fd

    def is_locked(self, path: str) -> bool:
        with self._mutex:
            node = self._lookup(path)
            return isinstance(node, _File) and node.locker is not None

    # -- inspection and crashes --------------------------------------------------------------

    def files(self, path: str) -> dict[str, bytes]:
        """The current contents of the files directly in directory `path`, by name."""
        with self._mutex:
            return {
                name: bytes(node.data)
                for name, node in self._dir(path).entries.items()
                if isinstance(node, _File)
            }

    def crash(self, mode: str = "drop", rng: random.Random | None = None) -> SimulatedDisk:
        """A new disk holding what a crash at this instant could leave; this one is unchanged.

        Every directory has its entries as of its last `fsync_dir` (a file that only has
        unsynced entries is gone), and every file its durable contents, plus, by `mode`,
        some of the writes (and truncations) made to it since its last `fdatasync`:

        - "drop": none of them (what the model guarantees, and no more);
        - "prefix": the first k of them, k random per file;
        - "torn": the first k, then the leading 512-byte sectors (possibly none) of the next;
        - "reorder": a random subset of the sectors they touched, each with its latest
          contents; the file has its durable size or its current one;
        - "process": all of them, still unsynced (a process crash, such as SIGKILL: the
          page cache survives; a later `crash()` of the result is the power loss).

        No file descriptor or lock carries over. `rng` drives the random choices.
        """
        if mode not in _MODES:
            raise ValueError(f"unknown crash mode {mode!r}; one of {_MODES}")
        rng = rng or random.Random()
        disk = SimulatedDisk()
        with self._mutex:
            memo: dict[int, _File | _Dir] = {}

            def copy(node: _File | _Dir) -> _File | _Dir:
                done = memo.get(id(node))
                if done is not None:
                    return done
                if isinstance(node, _File):
                    new: _File | _Dir = _survivor(node, mode, rng)
                    memo[id(node)] = new
                    return new
                d = _Dir()
                memo[id(node)] = d
                d.durable = {name: copy(child) for name, child in node.durable.items()}
                if mode == "process":
                    d.entries = {name: copy(child) for name, child in node.entries.items()}
                else:
                    d.entries = dict(d.durable)
                return d

            root = copy(self._root)
            assert isinstance(root, _Dir)
            disk._root = root
        return disk


def _survivor(node: _File, mode: str, rng: random.Random) -> _File:
    """The file a crash of `mode` leaves of `node`."""
    pending = node.pending
    if mode == "process":
        new = _File(node.durable)
        new.data = bytearray(node.data)
        new.pending = list(pending)
        return new
    if mode == "drop" or not pending:
        return _File(node.durable)
    if mode == "prefix":
        return _File(_replay(node.durable, pending[: rng.randint(0, len(pending))]))
    if mode == "torn":
        k = rng.randrange(len(pending))
        buf = _replay(node.durable, pending[:k])
        pos, data = pending[k]
        if data is None:  # a truncation is all or nothing
            if rng.random() < 0.5:
                _apply(buf, (pos, None))
        elif data:
            sectors = (pos + len(data) - 1) // SECTOR - pos // SECTOR + 1
            keep = (pos // SECTOR + rng.randrange(sectors)) * SECTOR - pos
            if keep > 0:
                _apply(buf, (pos, data[:keep]))
        return _File(buf)
    # "reorder": sectors touched since the last fdatasync, each kept or not
    touched: set[int] = set()
    length = len(node.durable)
    for pos, data in pending:
        if data is None:
            touched.update(range(pos // SECTOR, -(-length // SECTOR)))
            length = pos
        elif data:
            touched.update(range(pos // SECTOR, -(-(pos + len(data)) // SECTOR)))
            length = max(length, pos + len(data))
    current = node.data
    size = len(current)
    if size != len(node.durable) and rng.random() < 0.5:
        size = len(node.durable)
    buf = bytearray(node.durable)
    _apply(buf, (max(size, len(current)), None))
    for sector in sorted(touched):
        if rng.random() < 0.5:
            start = sector * SECTOR
            chunk = bytes(current[start : start + SECTOR])
            buf[start : start + SECTOR] = chunk + bytes(SECTOR - len(chunk))
    del buf[size:]
    return _File(buf)

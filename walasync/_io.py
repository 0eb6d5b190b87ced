"""The only place walasync makes system calls.

Every method blocks, so it runs on a worker thread, never on the event loop. Tests and
users swap in a subclass (see `walasync.testing`) to lose unsynced data, tear writes or
fail with EIO or ENOSPC at a chosen step.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
from collections.abc import Sequence

__all__ = ("FileIO", "read_file", "replace_file")

_ZEROS = bytes(1 << 20)
_RWF_DSYNC: int | None = getattr(os, "RWF_DSYNC", None)
# fallocate(2) itself, not glibc's posix_fallocate: where the file system lacks fallocate,
# posix_fallocate silently emulates it with one write per 4 KiB block (7.5 s for a 64 MiB
# segment on a FUSE file system); the system call says EOPNOTSUPP instead.
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    _fallocate.restype = ctypes.c_int
_REFUSED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


class FileIO:
    """Blocking file operations on real files (the default I/O layer)."""

    def open(self, path: str, *, create: bool = False) -> int:
        """Open `path` read-write, creating it if `create`."""
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        return os.open(path, flags, 0o644)

    def open_read(self, path: str) -> int:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwritev(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
        """Write all of `buffers` at `offset`, resuming after short writes."""
        total = sum(map(len, buffers))
        done = 0
        while done < total:
            if done == 0 and len(buffers) <= _IOV_MAX:
                n = os.pwritev(fd, buffers, offset)
            else:
                rest = b"".join(buffers)[done:]
                n = os.pwrite(fd, rest, offset + done)
            if n <= 0:  # pragma: no cover - the kernel reports ENOSPC rather than 0
                raise OSError(errno.EIO, "write made no progress")
            done += n

    def write_durable(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
        """Write `buffers` at `offset` and make them durable, as `pwritev` then `fdatasync`.

        On Linux this is one `pwritev2(RWF_DSYNC)` call: the same guarantee as fdatasync
        for the bytes written (and the file size), one system call fewer, and one fewer
        wait for the GIL on the I/O thread. A subclass that overrides `pwritev` or
        `fdatasync` gets the two calls instead, so it sees every write and every sync.
        """
        global _RWF_DSYNC
        cls = type(self)
        if (
            _RWF_DSYNC is not None
            and cls.pwritev is FileIO.pwritev
            and cls.fdatasync is FileIO.fdatasync
            and len(buffers) <= _IOV_MAX
        ):
            try:
                n = os.pwritev(fd, buffers, offset, _RWF_DSYNC)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                _RWF_DSYNC = None  # not on this kernel or file system: fall back
            else:
                if n == sum(map(len, buffers)):
                    return
                buffers, offset = [b"".join(buffers)[n:]], offset + n  # rare: short write
        self.pwritev(fd, buffers, offset)
        self.fdatasync(fd)

    def leaves_unwritten(self) -> bool:
        """Whether `preallocate` leaves blocks unwritten (allocated by fallocate, or holes
        of a sparse file), so that a durable write into them costs more until they have
        been written once."""
        cls = type(self)
        return cls.preallocate is FileIO.preallocate and cls.zero_fill is FileIO.zero_fill

    def zero_fill(self, fd: int, start: int, end: int) -> None:
        """Write zeros over [start, end)."""
        for pos in range(start, end, len(_ZEROS)):
            self.pwritev(fd, [_ZEROS[: min(end - pos, len(_ZEROS))]], pos)

    def fallocate(self, fd: int, size: int) -> None:
        """Allocate blocks for the first `size` bytes with fallocate(2), keeping what the
        file holds.

        Raises:
            OSError: EOPNOTSUPP (or ENOSYS) where the file system or kernel has no
                fallocate; ENOSPC where the disk is full.
        """
        if _fallocate is None:
            raise OSError(errno.ENOSYS, "fallocate is not available")
        while _fallocate(fd, 0, 0, size) != 0:
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, os.strerror(err))

    def preallocate(self, fd: int, size: int) -> None:
        """Give a file `size` bytes that read as zeros, without growing it later.

        fallocate(2) where the file system has it (blocks allocated, no data written, any
        size at once); elsewhere (some FUSE and NFS file systems) the file is extended as
        a sparse file, which costs no writes either: blocks are allocated as batches (and
        the zeros written ahead of them) land, and the fdatasync of each write commits
        them. Never glibc's emulation, one write per 4 KiB block.
        """
        try:
            self.fallocate(fd, size)
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            if self.size(fd) < size:
                self.truncate(fd, size)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """Read up to `size` bytes at `offset` (fewer only at end of file)."""
        data = os.pread(fd, size, offset)
        if len(data) == size or not data:
            return data
        parts = [data]
        got = len(data)
        while got < size:
            more = os.pread(fd, size - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def stat(self, path: str) -> tuple[int, float]:
        """(size in bytes, time of the last change in seconds since the epoch)."""
        st = os.stat(path)
        return st.st_size, st.st_mtime

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync_dir(self, path: str) -> None:
        """Make the directory's entries (created, renamed, removed files) durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def link(self, src: str, dst: str) -> None:
        """Give the file `src` a second name `dst` (a hard link; durable once the
        directory holding `dst` is fsynced)."""
        os.link(src, dst)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def makedirs(self, path: str) -> list[str]:
        """Create `path` and any missing parents; return the directories created, outermost
        first (each needs an fsync of its parent to be durable)."""
        missing: list[str] = []
        while not os.path.isdir(path):
            missing.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        for directory in reversed(missing):
            with contextlib.suppress(FileExistsError):  # made meanwhile; a file fails later
                os.mkdir(directory)
        return missing[::-1]

    def lock(self, fd: int) -> None:
        """Take an exclusive, non-blocking advisory lock (BlockingIOError if held)."""
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def is_locked(self, path: str) -> bool:
        """Whether some process holds the `lock` of the file at `path`, found without
        taking it (a writer opening the log meanwhile must not find it taken): from
        /proc/locks where there is one; elsewhere by taking a shared lock and releasing
        it at once."""
        st = os.stat(path)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        try:
            with open("/proc/locks", encoding="ascii", errors="replace") as locks:
                return any(
                    len(f) > 5 and f[1] == "FLOCK" and f[5] == key
                    for f in (line.split() for line in locks)
                )
        except OSError:
            pass
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # releases the lock
        return False


def replace_file(io: FileIO, directory: str, name: str, buffers: Sequence[bytes]) -> None:
    """Replace `directory/name` with the bytes of `buffers`, atomically and durably: they
    are written whole to `name.tmp` and fdatasync'd, renamed over `name`, then the
    directory is fsynced. A crash at any point leaves the old file or the new one, never a
    mix; a `name.tmp` left behind is overwritten by the next call. Every step goes through
    `io` (so `SimulatedDisk` can crash each)."""
    tmp = os.path.join(directory, name + ".tmp")
    fd = io.open(tmp, create=True)
    try:
        io.truncate(fd, 0)
        io.pwritev(fd, buffers, 0)
        io.fdatasync(fd)
    finally:
        io.close(fd)
    io.rename(tmp, os.path.join(directory, name))
    io.fsync_dir(directory)


def read_file(io: FileIO, path: str) -> bytes | None:
    """The whole of the file at `path`, or None if there is none."""
    try:
        fd = io.open_read(path)
    except FileNotFoundError:
        return None
    try:
        return io.pread(fd, io.size(fd), 0)
    finally:
        io.close(fd)

"""The only place walasync makes system calls.

Every method blocks, so it runs on a worker thread, never on the event loop. Tests and
users swap in a subclass (see `walasync.testing`) to lose unsynced data, tear writes or
fail with EIO or ENOSPC at a chosen step.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Sequence

__all__ = ("FileIO",)

_ZEROS = bytes(1 << 20)
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


class FileIO:
    """Blocking file operations on real files (the default I/O layer)."""

    def open(self, path: str, *, create: bool = False, exclusive: bool = False) -> int:
        """Open `path` read-write; `create` makes it, failing if it exists with `exclusive`."""
        flags = os.O_RDWR | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        if exclusive:
            flags |= os.O_EXCL
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

    def zero_fill(self, fd: int, start: int, end: int) -> None:
        """Write zeros over [start, end)."""
        while start < end:
            n = os.pwrite(fd, memoryview(_ZEROS)[: min(end - start, len(_ZEROS))], start)
            start += n

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

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def makedirs(self, path: str) -> bool:
        """Create `path` and its parents; True if anything was created."""
        if os.path.isdir(path):
            return False
        os.makedirs(path, exist_ok=True)
        return True

    def lock(self, fd: int) -> None:
        """Take an exclusive, non-blocking advisory lock (BlockingIOError if held)."""
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

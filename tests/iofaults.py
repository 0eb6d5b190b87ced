"""A controllable I/O layer for tests: count calls, hold fdatasync at a gate, fail on cue."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence

from walasync import FileIO


def _on_prealloc_thread() -> bool:
    return threading.current_thread().name.startswith("walasync-prealloc")


class ControlledIO(FileIO):
    """FileIO that counts batch writes and fdatasyncs of the I/O thread and can hold or
    fail them. The spare-segment thread is neither counted nor held."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.batch_writes = 0
        self.fdatasyncs = 0
        self.fail_write: int | None = None  # errno for the next batch write
        self.fail_fdatasync: int | None = None  # errno for the next fdatasync
        self.entered_fdatasync = threading.Event()

    def pwritev(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
        if len(buffers) == 2 and not _on_prealloc_thread():  # a batch: header + body
            self.batch_writes += 1
            if self.fail_write is not None:
                code, self.fail_write = self.fail_write, None
                raise OSError(code, os.strerror(code))
        super().pwritev(fd, buffers, offset)

    def fdatasync(self, fd: int) -> None:
        if not _on_prealloc_thread():
            self.entered_fdatasync.set()
            if not self.gate.wait(30):
                raise OSError(errno.ETIMEDOUT, "test gate never opened")
            self.fdatasyncs += 1
            if self.fail_fdatasync is not None:
                code, self.fail_fdatasync = self.fail_fdatasync, None
                raise OSError(code, os.strerror(code))
        super().fdatasync(fd)

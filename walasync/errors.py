"""Exceptions raised by walasync: one base class, each subclass named for what happened."""

from __future__ import annotations

import errno

__all__ = (
    "ApplyError",
    "BrokenLogError",
    "ClosedError",
    "CorruptionError",
    "DiskFullError",
    "LockedError",
    "MalformedRecordError",
    "NotALogError",
    "NothingToUndoError",
    "RecordTooLargeError",
    "TruncatedError",
    "UnsupportedFormatError",
    "WalError",
    "WrongLoopError",
)


class WalError(Exception):
    """Base class of every error walasync raises on purpose."""


class ClosedError(WalError):
    """The log was used after `close()` began."""


class LockedError(WalError):
    """Another `Wal`, in this process or another, holds the log's lock."""


class RecordTooLargeError(WalError, ValueError):
    """A record (or an `append_many` unit) is larger than `max_record_size`."""


class WrongLoopError(WalError, RuntimeError):
    """The log was used from an event loop other than the one that opened it."""


class BrokenLogError(WalError):
    """A write or fdatasync failed, so the log accepts nothing more.

    After a failed fdatasync the kernel may have dropped the dirty pages, so retrying could
    claim durability that does not exist (PostgreSQL's "fsyncgate"). Every pending and later
    append raises this error with the first failure as its cause; reopen the log to recover
    everything that was acknowledged.
    """


class DiskFullError(WalError):
    """The disk had no room (ENOSPC or EDQUOT) for a new segment or file.

    When a batch needed a new segment, nothing of that batch was written and the log stays
    open: later appends succeed once space is freed. At open, the log was not opened. The
    `OSError` is the cause.
    """


class CorruptionError(WalError):
    """Bytes on disk are not a valid log where acknowledged records must be.

    Attributes:
        path: the segment file.
        offset: the byte offset in that file where the invalid data starts.
    """

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason

    def __reduce__(self) -> tuple[type[CorruptionError], tuple[str, int, str]]:
        return (type(self), (self.path, self.offset, self.reason))


class NotALogError(CorruptionError):
    """A directory that should hold a log holds none: no segment file and no `META`
    (`.path` is the directory, `.offset` 0)."""


class MalformedRecordError(CorruptionError):
    """A record of a keyed log (`walasync.KeyedLog`) is not a valid keyed record.

    Attributes:
        path: the log's directory.
        lsn: the record's LSN.
        offset: -1 (the record is named by its LSN; the layer above the log does not know
            where in which segment it lies).
    """

    def __init__(self, path: str, lsn: int, reason: str) -> None:
        WalError.__init__(self, f"{path}: LSN {lsn}: {reason}")
        self.path = path
        self.offset = -1
        self.lsn = lsn
        self.reason = reason

    def __reduce__(self) -> tuple[type[CorruptionError], tuple[str, int, str]]:
        return (type(self), (self.path, self.lsn, self.reason))


class TruncatedError(WalError):
    """A read asked for records below `first_lsn`: `truncate_front` (or retention) removed
    them, before the read began or while it ran."""


class ApplyError(WalError):
    """`StateLog.apply`: the event is durable in the log, but the apply function raised
    (the function's exception is the cause).

    The event stays in the log at `lsn` and counts as applied: the state is whatever the
    function left (the object it was given, changed in place or not), and replay after a
    reopen does the same. `undo()` removes the event if it is still the last one.

    Attributes:
        lsn: the event's LSN.
    """

    def __init__(self, lsn: int, message: str) -> None:
        super().__init__(message)
        self.lsn = lsn

    def __reduce__(self) -> tuple[type[ApplyError], tuple[int, str]]:
        return (type(self), (self.lsn, str(self)))


class NothingToUndoError(WalError):
    """`StateLog.undo` found no event after the latest snapshot: every applied event is
    folded into it (a checkpoint covers it), or none was applied."""


class UnsupportedFormatError(CorruptionError):
    """A segment was written in a format version this walasync cannot read."""


def map_os_error(exc: OSError, what: str) -> WalError:
    """The walasync error for an `OSError` met while doing `what`, chained to it: the one
    boundary where system errors become ours (a full disk is `DiskFullError`)."""
    err: WalError
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        err = DiskFullError(f"{what}: no room on the disk ({exc.strerror})")
    else:
        err = WalError(f"{what}: {exc}")
    err.__cause__ = exc
    return err


for _name in __all__:
    globals()[_name].__module__ = "walasync"

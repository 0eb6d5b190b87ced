"""`walasync.open`: the options checked and the opener returned.

Kept apart from `_wal.py`, which may be compiled (mypyc): a compiled function checks its
arguments' annotated types itself, and would refuse a wrong type with its own TypeError (or
take `True` for 1) before the checks that give walasync's messages.
"""

from __future__ import annotations

import enum
import os
from typing import Any, Literal, overload

from ._io import FileIO
from ._opener import Opener
from ._options import Durability, Options
from ._readonly import ReadOnlyWal, open_readonly
from ._wal import DropHook, Wal, open_wal

__all__ = ("open",)

_WRITER_ONLY = "it is an option of a writer (walasync.open without readonly=True)"
_READER_ONLY = {
    "poll_interval": "its followers are woken by its appends, they never poll",
    "durable_only": "its followers already yield only durable records (up to synced_lsn)",
}


class _Unset(enum.Enum):
    """The default of an option that serves one mode only: tells "not given" from any
    value, so that one given in the other mode is refused even with its default value."""

    UNSET = "not given"

    def __repr__(self) -> str:
        return "<not given>"


_UNSET = _Unset.UNSET


@overload
def open(
    path: str | os.PathLike[str],
    *,
    readonly: Literal[False] = False,
    io: FileIO | None = None,
    durability: Durability | str = Options.durability,
    segment_size: int = Options.segment_size,
    max_record_size: int = Options.max_record_size,
    max_batch_bytes: int = Options.max_batch_bytes,
    max_batch_delay: float = Options.max_batch_delay,
    max_pending_bytes: int = Options.max_pending_bytes,
    sync_interval: float = Options.sync_interval,
    retention_bytes: int | None = None,
    retention_age: float | None = None,
    slow_sync_warning: float | None = Options.slow_sync_warning,
    on_segment_drop: DropHook | None = None,
    first_lsn: int | None = None,
    compression: Literal["zstd"] | None = None,
    compression_level: int = Options.compression_level,
) -> Opener[Wal]: ...


@overload
def open(
    path: str | os.PathLike[str],
    *,
    readonly: Literal[True],
    io: FileIO | None = None,
    poll_interval: float = 0.05,
    max_record_size: int = Options.max_record_size,
    durable_only: bool = False,
) -> Opener[ReadOnlyWal]: ...


@overload
def open(
    path: str | os.PathLike[str],
    *,
    readonly: bool,
    io: FileIO | None = None,
    max_record_size: int = Options.max_record_size,
) -> Opener[Wal] | Opener[ReadOnlyWal]: ...


def open(
    path: str | os.PathLike[str],
    *,
    readonly: bool = False,
    io: FileIO | None = None,
    durability: Durability | str | _Unset = _UNSET,
    segment_size: int | _Unset = _UNSET,
    max_record_size: int = Options.max_record_size,
    max_batch_bytes: int | _Unset = _UNSET,
    max_batch_delay: float | _Unset = _UNSET,
    max_pending_bytes: int | _Unset = _UNSET,
    sync_interval: float | _Unset = _UNSET,
    retention_bytes: int | _Unset | None = _UNSET,
    retention_age: float | _Unset | None = _UNSET,
    slow_sync_warning: float | _Unset | None = _UNSET,
    on_segment_drop: DropHook | _Unset | None = _UNSET,
    first_lsn: int | _Unset | None = _UNSET,
    poll_interval: float | _Unset = _UNSET,
    durable_only: bool | _Unset = _UNSET,
    compression: Literal["zstd"] | _Unset | None = _UNSET,
    compression_level: int | _Unset = _UNSET,
) -> Opener[Wal] | Opener[ReadOnlyWal]:
    """Open (creating if needed) the log in directory `path`, lock it and recover it.

    Use `wal = await walasync.open(path)` or `async with walasync.open(path) as wal:`.
    The options are those of `walasync.Options` (see README.md, "Options"). `io` swaps the
    I/O layer (`walasync.FileIO` or a subclass), to observe or inject faults in tests.
    `first_lsn` makes a new log start at that LSN (a replica restored from elsewhere, a log
    continuing another's numbering); on an existing log it must be the one it started at.
    `compression="zstd"` compresses batches that shrink (needs `walasync[zstd]`); a log
    reads back whatever it was written with, compressed or not.

    With `readonly=True`, open it for reading only (a `ReadOnlyWal`), in a process that
    is not the writer's: no lock, no file is ever written or repaired, the directory must
    exist; followers look for new records every `poll_interval` seconds; a compressed
    batch that would expand past its records' count times `max_record_size` is refused;
    `durable_only=True` makes it fdatasync what it finds and see only durable records.

    `io` and `max_record_size` serve both modes; every other option serves one, and given
    to the other (even with its default value) is a TypeError, as mypy says from the
    overloads: a writer's option does nothing on a read-only log, which never writes nor
    creates one (`first_lsn` included: read from an LSN with `read(start)`), and
    `poll_interval` and `durable_only` do nothing for the writer, whose followers are woken
    by its appends and only ever see durable records.

    Raises:
        TypeError: an option given that has no effect in the chosen mode (see above).
        ValueError: `path` is empty, an option is out of range or of the wrong type, or
            `first_lsn` is below 1 or differs from the existing log's.
        ImportError: `compression="zstd"` without the zstandard package.
        LockedError: another `Wal`, in this process or another, has the log open.
        CorruptionError: the last segment is damaged beyond a torn tail, or segments are
            missing after it.
        DiskFullError: the disk has no room for the first segment.
        WalError: the directory cannot be created, opened or locked.
    """
    if not isinstance(readonly, bool):
        raise ValueError(f"readonly must be True or False, not {readonly!r}")
    writer: dict[str, Any] = {
        "durability": durability,
        "segment_size": segment_size,
        "max_batch_bytes": max_batch_bytes,
        "max_batch_delay": max_batch_delay,
        "max_pending_bytes": max_pending_bytes,
        "sync_interval": sync_interval,
        "retention_bytes": retention_bytes,
        "retention_age": retention_age,
        "slow_sync_warning": slow_sync_warning,
        "compression": compression,
        "compression_level": compression_level,
    }
    if readonly:
        for name, value in (*writer.items(), ("on_segment_drop", on_segment_drop)):
            if value is not _UNSET:
                raise TypeError(f"{name} has no effect on a read-only log: {_WRITER_ONLY}")
        if first_lsn is not _UNSET:
            raise TypeError(
                "first_lsn has no effect on a read-only log: it never creates one (a new "
                "log starts at first_lsn); to read from an LSN, pass it to read(start)"
            )
    else:
        for name, value in (("poll_interval", poll_interval), ("durable_only", durable_only)):
            if value is not _UNSET:
                raise TypeError(
                    f"{name} has no effect on a writer: {_READER_ONLY[name]} (it is an "
                    "option of walasync.open(readonly=True))"
                )
    if io is not None and not isinstance(io, FileIO):
        raise ValueError(f"io must be a walasync.FileIO (or a subclass), not {io!r}")
    layer = io or FileIO()
    if readonly:
        return open_readonly(
            path,
            layer,
            0.05 if isinstance(poll_interval, _Unset) else poll_interval,
            max_record_size,
            False if isinstance(durable_only, _Unset) else durable_only,
        )
    if not os.fspath(path):
        raise ValueError("a log path must not be empty (use '.' for the current directory)")
    options = Options(
        max_record_size=max_record_size,
        **{name: value for name, value in writer.items() if value is not _UNSET},
    )
    first = None if isinstance(first_lsn, _Unset) else first_lsn
    if first is not None and (
        not isinstance(first, int) or isinstance(first, bool) or not 1 <= first <= 1 << 63
    ):
        raise ValueError(f"first_lsn must be an int from 1 to 2**63, not {first!r}")
    drop = None if isinstance(on_segment_drop, _Unset) else on_segment_drop
    if drop is not None and not callable(drop):
        raise ValueError(f"on_segment_drop must be an async function or None, not {drop!r}")
    where = os.fspath(path)
    return Opener(lambda: open_wal(where, options, layer, first, drop))

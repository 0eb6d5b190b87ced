"""`walasync.open`: the options checked and the opener returned.

Kept apart from `_wal.py`, which may be compiled (mypyc): a compiled function checks its
arguments' annotated types itself, and would refuse a wrong type with its own TypeError (or
take `True` for 1) before the checks that give walasync's messages.
"""

from __future__ import annotations

import os
from typing import Literal, overload

from ._io import FileIO
from ._opener import Opener
from ._options import Durability, Options
from ._readonly import ReadOnlyWal, open_readonly
from ._wal import DropHook, Wal, open_wal

__all__ = ("open",)


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


def open(
    path: str | os.PathLike[str],
    *,
    readonly: bool = False,
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
    poll_interval: float = 0.05,
    durable_only: bool = False,
    compression: Literal["zstd"] | None = None,
    compression_level: int = Options.compression_level,
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

    Raises:
        ValueError: `path` is empty, an option is out of range, or `first_lsn` is below 1
            or differs from the existing log's.
        ImportError: `compression="zstd"` without the zstandard package.
        LockedError: another `Wal`, in this process or another, has the log open.
        CorruptionError: the last segment is damaged beyond a torn tail, or segments are
            missing after it.
        DiskFullError: the disk has no room for the first segment.
        WalError: the directory cannot be created, opened or locked.
    """
    if readonly:
        return open_readonly(path, io or FileIO(), poll_interval, max_record_size, durable_only)
    if not os.fspath(path):
        raise ValueError("a log path must not be empty (use '.' for the current directory)")
    options = Options(
        durability=Durability(durability),
        segment_size=segment_size,
        max_record_size=max_record_size,
        max_batch_bytes=max_batch_bytes,
        max_batch_delay=max_batch_delay,
        max_pending_bytes=max_pending_bytes,
        sync_interval=sync_interval,
        retention_bytes=retention_bytes,
        retention_age=retention_age,
        compression=compression,
        compression_level=compression_level,
        slow_sync_warning=slow_sync_warning,
    )
    if first_lsn is not None and (not isinstance(first_lsn, int) or not 1 <= first_lsn <= 1 << 63):
        raise ValueError(f"first_lsn must be an int from 1 to 2**63, not {first_lsn!r}")
    where, layer = os.fspath(path), io or FileIO()
    return Opener(lambda: open_wal(where, options, layer, first_lsn, on_segment_drop))

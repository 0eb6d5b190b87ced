"""`walasync.open`'s options: each one checked, and refused in the mode it does nothing in.

`io` and `max_record_size` serve both modes; every other option serves the writer or the
read-only log only, and given to the other mode is a TypeError naming it (as mypy says from
the overloads), whatever its value: the default included, and `first_lsn`, which a
read-only log (it never creates one) has no use for. A bad value is a ValueError.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

import walasync
from walasync import FileIO, Opener, ReadOnlyWal, Wal


class NotAnIO:
    """Not a `walasync.FileIO` (with a repr that names the same test in every worker)."""

    def __repr__(self) -> str:
        return "NotAnIO()"


async def drop_hook(segment: walasync.SegmentInfo) -> bool:
    return True


def ident(option: object) -> str:
    """A test id that is the same in every xdist worker (no addresses)."""
    if not isinstance(option, dict):
        return str(option)
    return ",".join(f"{k}={getattr(v, '__name__', repr(v))}" for k, v in option.items())


WRITER_ONLY: list[dict[str, Any]] = [
    {"durability": "bogus"},
    {"durability": walasync.Durability.FSYNC},
    {"segment_size": 1},
    {"segment_size": 64 << 20},
    {"max_batch_bytes": 1 << 20},
    {"max_batch_delay": 0.0},
    {"max_pending_bytes": 1 << 20},
    {"sync_interval": 0.05},
    {"retention_bytes": -1},
    {"retention_bytes": None},
    {"retention_age": 60.0},
    {"slow_sync_warning": None},
    {"on_segment_drop": drop_hook},
    {"on_segment_drop": None},
    {"first_lsn": 99},
    {"first_lsn": 1},
    {"first_lsn": None},
    {"compression": "zstd"},
    {"compression": None},
    {"compression_level": 3},
]


@pytest.mark.parametrize("option", WRITER_ONLY, ids=ident)
async def test_a_writers_option_on_a_read_only_log_is_a_type_error(
    log_dir: Path, option: dict[str, Any]
) -> None:
    async with walasync.open(log_dir) as wal:
        await wal.append(b"x")
    (name,) = option
    with pytest.raises(TypeError, match=rf"^{name} has no effect on a read-only log"):
        walasync.open(log_dir, readonly=True, **option)
    with pytest.raises(TypeError, match=name):  # checked before the path is looked at
        walasync.open(log_dir / "nothing", readonly=True, **option)
    assert not (log_dir / "nothing").exists()


async def test_first_lsn_on_a_read_only_log_points_to_read_start(log_dir: Path) -> None:
    """The audit's case: a read-only opening with a `first_lsn` the log never had."""
    async with walasync.open(log_dir) as wal:
        await wal.append_many([b"a", b"b", b"c"])
    with pytest.raises(TypeError, match=r"never creates one.*read\(start\)"):
        walasync.open(log_dir, readonly=True, first_lsn=2)  # type: ignore[call-overload]
    async with walasync.open(log_dir, readonly=True) as ro:
        assert [r.data async for r in ro.read(2)] == [b"b", b"c"]


@pytest.mark.parametrize(
    "option",
    [
        {"poll_interval": -5},
        {"poll_interval": 0.05},
        {"durable_only": True},
        {"durable_only": False},
    ],
    ids=ident,
)
async def test_a_readers_option_on_a_writer_is_a_type_error(
    tmp_path: Path, option: dict[str, Any]
) -> None:
    (name,) = option
    with pytest.raises(TypeError, match=rf"^{name} has no effect on a writer: .*readonly=True"):
        walasync.open(tmp_path / "log", **option)
    with pytest.raises(TypeError, match=name):
        walasync.open(tmp_path / "log", readonly=False, **option)
    assert not (tmp_path / "log").exists()


async def test_mypy_refuses_what_the_mode_refuses(log_dir: Path) -> None:
    """Each `type: ignore` here is checked by mypy (strict: an unneeded one is an error)."""
    with pytest.raises(TypeError, match="segment_size"):
        walasync.open(log_dir, readonly=True, segment_size=1 << 20)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="poll_interval"):
        walasync.open(log_dir, poll_interval=0.1)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="durable_only"):
        walasync.open(log_dir, readonly=False, durable_only=True)  # type: ignore[call-overload]


@pytest.mark.parametrize("readonly", [False, True])
async def test_the_options_of_both_modes_and_a_readonly_flag(log_dir: Path, readonly: bool) -> None:
    """`io` and `max_record_size` serve both; `readonly` may be a plain bool (the union
    overload)."""
    async with walasync.open(log_dir, max_record_size=8) as wal:
        await wal.append(b"12345678")
        with pytest.raises(walasync.RecordTooLargeError):
            await wal.append(b"123456789")
    opener: Opener[Wal] | Opener[ReadOnlyWal] = walasync.open(
        log_dir, readonly=readonly, io=FileIO(), max_record_size=8
    )
    log = await opener
    try:
        assert isinstance(log, ReadOnlyWal) is readonly and isinstance(log, Wal) is not readonly
        assert [r.data async for r in log.read()] == [b"12345678"]
    finally:
        await log.close()


@pytest.mark.parametrize(
    ("readonly", "option"),
    [
        (True, {"poll_interval": 0}),
        (True, {"poll_interval": -5}),
        (True, {"poll_interval": math.nan}),
        (True, {"poll_interval": math.inf}),
        (True, {"poll_interval": "0.1"}),
        (True, {"poll_interval": True}),
        (True, {"durable_only": 1}),
        (True, {"durable_only": "yes"}),
        (True, {"durable_only": None}),
        (True, {"max_record_size": 0}),
        (True, {"io": NotAnIO()}),
        (False, {"io": NotAnIO()}),
        (False, {"max_record_size": True}),
        (False, {"first_lsn": 0}),
        (False, {"first_lsn": True}),
        (False, {"first_lsn": 1.0}),
        (False, {"first_lsn": (1 << 63) + 1}),
        (False, {"on_segment_drop": 42}),
        (False, {"max_batch_delay": math.nan}),
        (False, {"max_batch_delay": math.inf}),
        (False, {"sync_interval": math.nan}),
        (False, {"sync_interval": math.inf}),
        (False, {"retention_bytes": math.nan}),
        (False, {"retention_age": math.nan}),
        (False, {"durability": "bogus"}),
        (False, {"segment_size": 1}),
    ],
    ids=ident,
)
async def test_a_bad_value_is_a_value_error_naming_the_option(
    log_dir: Path, readonly: bool, option: dict[str, Any]
) -> None:
    async with walasync.open(log_dir):
        pass
    (name,) = option
    with pytest.raises(ValueError, match=name if name != "durability" else "bogus"):
        walasync.open(log_dir, readonly=readonly, **option)


@pytest.mark.parametrize("readonly", ["yes", 1, None])
def test_readonly_must_be_a_bool(tmp_path: Path, readonly: object) -> None:
    with pytest.raises(ValueError, match="readonly must be True or False"):
        walasync.open(tmp_path / "log", readonly=readonly)  # type: ignore[call-overload]
    assert not (tmp_path / "log").exists()


def test_the_options_dataclass_refuses_nan_and_endless_timers() -> None:
    for name in ("max_batch_delay", "sync_interval"):
        for bad in (math.nan, math.inf):
            kwargs: dict[str, Any] = {name: bad}
            with pytest.raises(ValueError, match=f"{name} must be a finite number"):
                walasync.Options(**kwargs)
    for name in ("retention_bytes", "retention_age"):
        kwargs = {name: math.nan}
        with pytest.raises(ValueError, match=name):
            walasync.Options(**kwargs)
    assert walasync.Options(retention_age=math.inf).retention_age == math.inf

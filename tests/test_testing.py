"""`walasync.testing.SimulatedDisk`: its model of durability, its crash modes, its step hook
and its scripted faults, checked on the disk alone; then a round trip of a real log on it."""

from __future__ import annotations

import errno
import random
import threading
import time

import pytest

import walasync
from walasync.testing import SimulatedDisk

SECTOR = SimulatedDisk.SECTOR


def fresh() -> SimulatedDisk:
    return SimulatedDisk.from_files({}, dirs=["/d"])


def durable_file(disk: SimulatedDisk, path: str, data: bytes = b"") -> int:
    """Create `path` with `data`, all durable; return a read-write fd."""
    fd = disk.open(path, create=True)
    disk.pwritev(fd, [data], 0)
    disk.fdatasync(fd)
    disk.fsync_dir(path.rsplit("/", 1)[0] or "/")
    return fd


def read(disk: SimulatedDisk, path: str) -> bytes:
    fd = disk.open_read(path)
    try:
        return disk.pread(fd, 1 << 30, 0)
    finally:
        disk.close(fd)


# -- the model of durability --------------------------------------------------------------


def test_unsynced_write_is_lost_and_fdatasync_keeps_it() -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/f", b"old")
    disk.pwritev(fd, [b"new", b"er"], 0)
    assert disk.files("/d") == {"f": b"newer"}
    assert disk.crash().files("/d") == {"f": b"old"}
    disk.fdatasync(fd)
    assert disk.crash().files("/d") == {"f": b"newer"}


def test_fdatasync_through_another_fd_covers_the_file() -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/f")
    other = disk.open("/d/f")
    disk.pwritev(fd, [b"abc"], 0)
    disk.fdatasync(other)
    assert disk.crash().files("/d") == {"f": b"abc"}


def test_write_durable_is_a_write_then_an_fdatasync() -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/f")
    seen: list[tuple[int, str, dict[str, bytes]]] = []
    disk.on_step = lambda k, op: seen.append((k, op, disk.crash().files("/d")))
    disk.write_durable(fd, [b"ab", b"cd"], 2)
    assert seen == [(5, "write", {"f": b""}), (6, "fdatasync", {"f": b""})]
    assert disk.crash().files("/d") == {"f": b"\0\0abcd"}


def test_new_file_without_fsync_dir_vanishes_even_if_synced() -> None:
    disk = fresh()
    fd = disk.open("/d/new", create=True)
    disk.write_durable(fd, [b"data"], 0)
    assert disk.crash().files("/d") == {}
    disk.fsync_dir("/d")
    assert disk.crash().files("/d") == {"new": b"data"}


def test_durable_entry_with_unsynced_contents_is_its_durable_contents() -> None:
    disk = fresh()
    fd = disk.open("/d/f", create=True)
    disk.fsync_dir("/d")
    disk.pwritev(fd, [b"never synced"], 0)
    assert disk.crash().files("/d") == {"f": b""}


def test_rename_is_durable_only_after_fsync_dir() -> None:
    disk = fresh()
    durable_file(disk, "/d/a", b"A")
    durable_file(disk, "/d/b", b"B")
    disk.rename("/d/a", "/d/b")
    assert disk.files("/d") == {"b": b"A"}
    assert disk.crash().files("/d") == {"a": b"A", "b": b"B"}
    disk.fsync_dir("/d")
    assert disk.crash().files("/d") == {"b": b"A"}


def test_rename_across_directories_needs_both_fsynced() -> None:
    disk = SimulatedDisk.from_files({"/x/f": b"F"}, dirs=["/y"])
    disk.rename("/x/f", "/y/g")
    disk.fsync_dir("/y")
    # The new entry is durable, the old one too: the file is reachable under both names.
    assert disk.crash().files("/x") == {"f": b"F"}
    assert disk.crash().files("/y") == {"g": b"F"}
    disk.fsync_dir("/x")
    assert disk.crash().files("/x") == {}


def test_unlink_is_durable_only_after_fsync_dir_and_fds_outlive_it() -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/f", b"kept")
    disk.unlink("/d/f")
    assert disk.files("/d") == {}
    assert disk.pread(fd, 10, 0) == b"kept"  # the inode lives on while open
    disk.pwritev(fd, [b"K"], 0)
    disk.fdatasync(fd)
    assert disk.crash().files("/d") == {"f": b"Kept"}  # the entry is still durable
    disk.fsync_dir("/d")
    assert disk.crash().files("/d") == {}


def test_fd_follows_its_file_through_a_rename() -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/a")
    disk.rename("/d/a", "/d/b")
    disk.fsync_dir("/d")
    disk.write_durable(fd, [b"via old fd"], 0)
    assert disk.crash().files("/d") == {"b": b"via old fd"}


def test_truncate_is_durable_at_fdatasync() -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/f", b"0123456789")
    disk.truncate(fd, 4)
    assert disk.size(fd) == 4
    assert disk.crash().files("/d") == {"f": b"0123456789"}
    disk.truncate(fd, 6)
    assert disk.files("/d") == {"f": b"0123\0\0"}
    disk.fdatasync(fd)
    assert disk.crash().files("/d") == {"f": b"0123\0\0"}


def test_makedirs_entry_is_durable_at_fsync_dir_of_its_parent() -> None:
    disk = fresh()
    assert disk.makedirs("/d/a/b") == ["/d/a", "/d/a/b"]
    assert disk.makedirs("/d/a/b") == []
    disk.fsync_dir("/d/a")  # b's entry is durable, a's is not
    assert disk.crash().listdir("/d") == []
    disk.fsync_dir("/d")
    assert disk.crash().listdir("/d/a") == ["b"]


def test_zero_fill_and_pread_past_the_end() -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/f", b"abc")
    disk.zero_fill(fd, 1, 5)
    assert disk.pread(fd, 100, 0) == b"a\0\0\0\0"
    assert disk.pread(fd, 10, 50) == b""
    assert disk.size(fd) == 5


def test_from_files_is_durable() -> None:
    disk = SimulatedDisk.from_files({"/a/b/f": b"1", "/a/g": b"2"}, dirs=["/e/f"])
    image = disk.crash()
    assert image.files("/a") == {"g": b"2"}
    assert image.files("/a/b") == {"f": b"1"}
    assert image.listdir("/e") == ["f"]


def test_errors_are_those_of_posix() -> None:
    disk = fresh()
    with pytest.raises(FileNotFoundError):
        disk.open("/d/missing")
    with pytest.raises(FileNotFoundError):
        disk.open("/nowhere/f", create=True)
    with pytest.raises(FileNotFoundError):
        disk.unlink("/d/missing")
    with pytest.raises(FileNotFoundError):
        disk.rename("/d/missing", "/d/x")
    with pytest.raises(FileNotFoundError):
        disk.listdir("/d/missing")
    with pytest.raises(IsADirectoryError):
        disk.open("/d")
    fd = durable_file(disk, "/d/f")
    with pytest.raises(NotADirectoryError):
        disk.listdir("/d/f")
    with pytest.raises(FileExistsError):
        disk.makedirs("/d/f")
    ro = disk.open_read("/d/f")
    with pytest.raises(OSError) as info:
        disk.pwritev(ro, [b"x"], 0)
    assert info.value.errno == errno.EBADF
    disk.close(fd)
    with pytest.raises(OSError) as info:
        disk.fdatasync(fd)
    assert info.value.errno == errno.EBADF


def test_lock_is_exclusive_across_fds_and_released_by_close() -> None:
    disk = fresh()
    a = durable_file(disk, "/d/LOCK")
    b = disk.open("/d/LOCK")
    disk.lock(a)
    disk.lock(a)  # again, by its holder
    with pytest.raises(BlockingIOError):
        disk.lock(b)
    disk.close(a)
    disk.lock(b)


def test_crash_carries_no_fds_or_locks() -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/LOCK")
    disk.lock(fd)
    image = disk.crash()
    with pytest.raises(OSError) as info:
        image.size(fd)
    assert info.value.errno == errno.EBADF
    image.lock(image.open("/d/LOCK"))  # not held there
    with pytest.raises(BlockingIOError):
        disk.lock(disk.open("/d/LOCK"))  # still held here


def test_crash_leaves_the_disk_alone() -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/f", b"a")
    disk.pwritev(fd, [b"b"], 1)
    disk.crash("reorder", random.Random(1))
    image = disk.crash()
    image_fd = image.open("/d/f")
    image.write_durable(image_fd, [b"changed"], 0)
    assert disk.files("/d") == {"f": b"ab"}
    disk.fdatasync(fd)
    assert disk.crash().files("/d") == {"f": b"ab"}


# -- crash modes ----------------------------------------------------------------------------


def scribble(disk: SimulatedDisk, fd: int, rng: random.Random) -> list[tuple[int, bytes]]:
    """A few unsynced writes of random sizes at random offsets, some growing the file."""
    writes = []
    for _ in range(rng.randint(1, 5)):
        offset = rng.randrange(0, 6 * SECTOR)
        data = rng.randbytes(rng.randint(1, 3 * SECTOR))
        disk.pwritev(fd, [data], offset)
        writes.append((offset, data))
    return writes


def apply(base: bytes, writes: list[tuple[int, bytes]]) -> bytes:
    buf = bytearray(base)
    for offset, data in writes:
        buf.extend(bytes(max(0, offset - len(buf))))
        buf[offset : offset + len(data)] = data
    return bytes(buf)


def sectors(data: bytes, length: int) -> list[bytes]:
    data = data[:length].ljust(length, b"\0")
    return [data[i : i + SECTOR] for i in range(0, length, SECTOR)]


def scribbled(
    seed: int,
) -> tuple[random.Random, SimulatedDisk, bytes, list[tuple[int, bytes]]]:
    """A file with random durable contents and random unsynced writes over it."""
    rng = random.Random(seed)
    disk = fresh()
    durable = rng.randbytes(rng.randint(0, 4 * SECTOR))
    fd = durable_file(disk, "/d/f", durable)
    return rng, disk, durable, scribble(disk, fd, rng)


@pytest.mark.parametrize("seed", range(40))
def test_prefix_keeps_a_prefix_of_the_unsynced_writes(seed: int) -> None:
    rng, disk, durable, writes = scribbled(seed)
    got = disk.crash("prefix", rng).files("/d")["f"]
    assert got in {apply(durable, writes[:k]) for k in range(len(writes) + 1)}


@pytest.mark.parametrize("seed", range(40))
def test_torn_keeps_a_prefix_then_leading_sectors_of_the_next_write(seed: int) -> None:
    rng, disk, durable, writes = scribbled(seed)
    got = disk.crash("torn", rng).files("/d")["f"]
    allowed = set()
    for k, (offset, data) in enumerate(writes):
        before = apply(durable, writes[:k])
        allowed.add(before)
        for end in range((offset // SECTOR + 1) * SECTOR, offset + len(data), SECTOR):
            allowed.add(apply(before, [(offset, data[: end - offset])]))
    assert got in allowed


@pytest.mark.parametrize("seed", range(40))
def test_reorder_keeps_each_sector_old_or_new(seed: int) -> None:
    rng, disk, durable, _ = scribbled(seed)
    current = disk.files("/d")["f"]
    got = disk.crash("reorder", rng).files("/d")["f"]
    assert len(got) in {len(durable), len(current)}
    for i, (g, old, new) in enumerate(
        zip(
            sectors(got, len(got)),
            sectors(durable, len(got)),
            sectors(current, len(got)),
            strict=True,
        )
    ):
        assert g in (old, new), f"sector {i}"


@pytest.mark.parametrize("mode", ["prefix", "torn", "reorder"])
def test_modes_reach_states_strictly_between_durable_and_current(mode: str) -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/f", bytes(4 * SECTOR))
    for i in range(4):
        disk.pwritev(fd, [bytes([i + 1]) * SECTOR * 2], i * SECTOR)
    durable, current = bytes(4 * SECTOR), disk.files("/d")["f"]
    rng = random.Random(0)
    seen = {disk.crash(mode, rng).files("/d")["f"] for _ in range(200)}
    between = seen - {durable, current}
    assert len(between) >= 3, (mode, len(seen))
    if mode == "torn":
        # Some state keeps part of a write that another write later covers.
        assert any(s[2 * SECTOR : 3 * SECTOR] == bytes([2]) * SECTOR for s in between)


def test_modes_drop_unsynced_directory_entries() -> None:
    disk = fresh()
    fd = disk.open("/d/new", create=True)
    disk.pwritev(fd, [b"x" * 3000], 0)
    for mode in ("drop", "prefix", "torn", "reorder"):
        assert disk.crash(mode, random.Random(0)).files("/d") == {}


def test_reorder_can_keep_data_past_the_durable_size_only_with_the_new_size() -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/f", b"a" * SECTOR)
    disk.pwritev(fd, [b"b" * 3 * SECTOR], SECTOR)
    rng = random.Random(5)
    sizes = {len(disk.crash("reorder", rng).files("/d")["f"]) for _ in range(50)}
    assert sizes == {SECTOR, 4 * SECTOR}


def test_process_crash_keeps_everything_unsynced_then_power_loss_drops_it() -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/f", b"synced")
    disk.pwritev(fd, [b"+cache"], 6)
    new = disk.open("/d/new", create=True)
    disk.write_durable(new, [b"n"], 0)
    disk.lock(fd)
    after_kill = disk.crash("process")
    assert after_kill.files("/d") == {"f": b"synced+cache", "new": b"n"}
    after_kill.lock(after_kill.open("/d/f"))  # the lock died with the process
    assert after_kill.crash().files("/d") == {"f": b"synced"}
    after_kill.fsync_dir("/d")
    assert after_kill.crash().files("/d") == {"f": b"synced", "new": b"n"}


def test_unknown_mode_or_op_is_an_error() -> None:
    disk = fresh()
    with pytest.raises(ValueError):
        disk.crash("melt")
    with pytest.raises(ValueError):
        disk.fail_at("read", 1, errno.EIO)
    with pytest.raises(ValueError):
        disk.slow("sleep", 1)


# -- steps and faults -------------------------------------------------------------------------


def test_every_mutating_call_is_a_step_seen_before_it_takes_effect() -> None:
    disk = fresh()
    seen: list[tuple[int, str, list[str], dict[str, bytes]]] = []

    def hook(step: int, op: str) -> None:
        image = disk.crash("process")  # the state just before the step
        seen.append((step, op, image.listdir("/d"), image.files("/d")))

    disk.on_step = hook
    disk.makedirs("/d/sub")
    fd = disk.open("/d/f", create=True)
    disk.open_read("/d/f")
    disk.open("/d/f")  # no create: not a step
    disk.pwritev(fd, [b"abc"], 0)
    disk.zero_fill(fd, 3, 5)
    disk.pread(fd, 5, 0)
    disk.size(fd)
    disk.fdatasync(fd)
    disk.truncate(fd, 1)
    disk.fsync_dir("/d")
    disk.rename("/d/f", "/d/g")
    disk.listdir("/d")
    disk.unlink("/d/g")
    disk.close(fd)
    assert [(k, op) for k, op, _, _ in seen] == list(
        enumerate(
            [
                "makedirs",
                "open",
                "write",
                "write",
                "fdatasync",
                "truncate",
                "fsync_dir",
                "rename",
                "unlink",
            ],
            1,
        )
    )
    assert disk.steps == 9
    by_op: dict[str, tuple[list[str], dict[str, bytes]]] = {}
    for _, op, names, files in seen:
        by_op.setdefault(op, (names, files))  # the first call of each op
    assert by_op["makedirs"] == ([], {})
    assert by_op["open"] == (["sub"], {})
    assert by_op["write"][1] == {"f": b""}  # the first write, before it happened
    assert by_op["fdatasync"][1] == {"f": b"abc\0\0"}
    assert by_op["rename"][0] == ["sub", "f"]
    assert by_op["unlink"][0] == ["sub", "g"]


def test_fail_at_fails_the_nth_call_from_now_without_effect() -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/f")  # one write and one fdatasync before the faults
    disk.fail_at("write", 2, errno.ENOSPC)
    disk.fail_at("fdatasync", 1, errno.EIO)
    disk.pwritev(fd, [b"1"], 0)
    with pytest.raises(OSError) as info:
        disk.pwritev(fd, [b"2"], 1)
    assert info.value.errno == errno.ENOSPC
    disk.pwritev(fd, [b"3"], 2)  # a fault fires once
    with pytest.raises(OSError) as info:
        disk.fdatasync(fd)
    assert info.value.errno == errno.EIO
    assert disk.files("/d") == {"f": b"1\x003"}
    assert disk.crash().files("/d") == {"f": b""}  # the failed fdatasync made nothing durable
    disk.fdatasync(fd)
    assert disk.crash().files("/d") == {"f": b"1\x003"}


@pytest.mark.parametrize(
    ("op", "call"),
    [
        ("open", lambda d, fd: d.open("/d/f")),
        ("write", lambda d, fd: d.zero_fill(fd, 0, 10)),
        ("fsync_dir", lambda d, fd: d.fsync_dir("/d")),
        ("rename", lambda d, fd: d.rename("/d/f", "/d/g")),
        ("unlink", lambda d, fd: d.unlink("/d/f")),
        ("truncate", lambda d, fd: d.truncate(fd, 100)),
        ("makedirs", lambda d, fd: d.makedirs("/d/sub")),
    ],
)
def test_fail_at_each_op(op: str, call: object) -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/f", b"x")
    before = (disk.listdir("/d"), disk.files("/d"))
    disk.fail_at(op, 1, errno.EROFS)
    with pytest.raises(OSError) as info:
        call(disk, fd)  # type: ignore[operator]
    assert info.value.errno == errno.EROFS
    assert (disk.listdir("/d"), disk.files("/d")) == before
    call(disk, fd)  # type: ignore[operator]


def test_failed_call_is_still_a_step() -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/f")
    steps = disk.steps
    disk.fail_at("fdatasync", 1, errno.EIO)
    with pytest.raises(OSError):
        disk.write_durable(fd, [b"x"], 0)
    assert disk.steps == steps + 2


def test_short_write_keeps_a_prefix_then_raises_eio() -> None:
    disk = fresh()
    fd = durable_file(disk, "/d/f")
    disk.short_write(1, 3)
    with pytest.raises(OSError) as info:
        disk.write_durable(fd, [b"abc", b"def"], 0)
    assert info.value.errno == errno.EIO
    assert disk.files("/d") == {"f": b"abc"}
    assert disk.crash().files("/d") == {"f": b""}  # no fdatasync followed


def test_slow_sleeps_before_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # The sleeps themselves, not the clock: how long a call took is up to the machine.
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    disk = fresh()
    fd = durable_file(disk, "/d/f")
    disk.slow("fdatasync", 0.05)
    disk.fdatasync(fd)
    disk.fdatasync(fd)
    disk.pwritev(fd, [b"x"], 0)  # other calls are not slowed
    assert slept == [0.05, 0.05]
    disk.slow("fdatasync", 0)
    disk.fdatasync(fd)
    assert slept == [0.05, 0.05]
    with pytest.raises(ValueError, match="unknown op"):
        disk.slow("fdatasnyc", 1)


def test_threads_share_a_disk_safely() -> None:
    disk = fresh()
    fds = [durable_file(disk, f"/d/{i}") for i in range(4)]

    def writer(fd: int) -> None:
        for j in range(300):
            disk.write_durable(fd, [b"%04d" % j], 4 * j)
            disk.crash("reorder", random.Random(j)) if j % 50 == 0 else None

    threads = [threading.Thread(target=writer, args=(fd,)) for fd in fds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = b"".join(b"%04d" % j for j in range(300))
    assert disk.crash().files("/d") == {str(i): expected for i in range(4)}
    assert disk.steps == 4 * 4 + 4 * 600


# -- a real log on the simulated disk ---------------------------------------------------------


async def test_a_log_round_trips_on_the_simulated_disk() -> None:
    disk = SimulatedDisk.from_files({}, dirs=["/data"])
    async with walasync.open("/data/log", io=disk, segment_size=4096) as wal:
        lsns = [await wal.append(b"%d" % i * 300) for i in range(30)]
        assert await wal.append_many([b"a", b"", b"b"]) == range(31, 34)
    assert lsns == list(range(1, 31))
    assert len([n for n in disk.files("/data/log") if n.endswith(".wal")]) > 2
    async with walasync.open("/data/log", io=disk.crash(), segment_size=4096) as wal:
        records = [r async for r in wal.read()]
    assert [r.data for r in records] == [b"%d" % i * 300 for i in range(30)] + [b"a", b"", b"b"]


async def test_a_log_is_locked_on_the_simulated_disk() -> None:
    disk = SimulatedDisk.from_files({}, dirs=["/data"])
    async with walasync.open("/data/log", io=disk):
        with pytest.raises(walasync.LockedError):
            await walasync.open("/data/log", io=disk)
    async with walasync.open("/data/log", io=disk) as wal:
        assert wal.last_lsn == 0


async def test_an_injected_fdatasync_error_breaks_the_log() -> None:
    disk = SimulatedDisk.from_files({}, dirs=["/data"])
    async with walasync.open("/data/log", io=disk) as wal:
        assert await wal.append(b"kept") == 1
        disk.fail_at("fdatasync", 1, errno.EIO)
        with pytest.raises(walasync.BrokenLogError):
            await wal.append(b"lost")
    async with walasync.open("/data/log", io=disk.crash()) as wal:
        assert [r.data async for r in wal.read()] == [b"kept"]

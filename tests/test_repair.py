"""`walasync.repair` under crash simulation: a power loss before every I/O step of a repair.

Each case damages a log on a `SimulatedDisk` (a bad batch in a sealed segment, invalid bytes
before valid ones in the last segment, a sealed segment cut inside its header, a lost last
segment, a damaged META), repairs it, and takes the images a power loss before each step
would leave ("drop", "torn", "reorder"). Every image must be one of:

- untouched: the log's files (segments and META) exactly as before the repair; or
- repaired or committed to be: the backup directory holds, byte for byte, every log file
  that is not as it was, and the log opens (finishing the cut if need be) with exactly the
  records below the cut, every one of them, and verifies.

So a crash never loses a record below the cut, and whatever the cut removes is in the backup.
"""

from __future__ import annotations

import asyncio
import posixpath
import random
from collections.abc import Callable

import pytest
from conftest import run

import walasync
from walasync.testing import SimulatedDisk

ROOT = "/data"
LOG = "/data/log"
MODES = ("drop", "torn", "reorder")
RECORDS = 120


def data(i: int) -> bytes:
    return b"r%d|" % i + bytes(i * 7 % 90)


def build() -> dict[str, bytes]:
    """A closed log of RECORDS records over several 4 KiB segments: its files by name."""
    disk = SimulatedDisk.from_files({}, dirs=[ROOT])

    async def write() -> None:
        async with walasync.open(LOG, io=disk, segment_size=4096) as wal:
            for i in range(1, RECORDS + 1, 3):
                await wal.append_many([data(j) for j in range(i, min(i + 3, RECORDS + 1))])

    run("asyncio", write())
    return disk.files(LOG)


BASE = build()
SEGMENTS = sorted(n for n in BASE if n.endswith(".wal"))


def flipped(name: str, offset: int) -> Callable[[dict[str, bytes]], None]:
    def damage(files: dict[str, bytes]) -> None:
        raw = bytearray(files[name])
        raw[offset] ^= 0x10
        files[name] = bytes(raw)

    return damage


def cut_short(name: str, size: int) -> Callable[[dict[str, bytes]], None]:
    def damage(files: dict[str, bytes]) -> None:
        files[name] = files[name][:size]

    return damage


def lost(name: str) -> Callable[[dict[str, bytes]], None]:
    def damage(files: dict[str, bytes]) -> None:
        del files[name]

    return damage


def last_batches(files: dict[str, bytes]) -> None:
    """Invalid bytes before valid batches in the last segment (an INTERVAL power loss)."""
    raw = bytearray(files[SEGMENTS[-1]])
    raw[32 + 24 + 2] ^= 0x01  # the first batch's payload: later batches stay valid
    files[SEGMENTS[-1]] = bytes(raw)


CASES = {
    "bad batch in a sealed segment": flipped(SEGMENTS[1], 32 + 24 + 5),
    "invalid bytes before valid ones at the end": last_batches,
    "sealed segment cut inside its header": cut_short(SEGMENTS[1], 10),
    "lost last segment": lost(SEGMENTS[-1]),
    "damaged META": flipped("META", 20),
}


def log_files(disk: SimulatedDisk) -> dict[str, bytes]:
    """The log's own files (segments, META) on a disk."""
    return {n: d for n, d in disk.files(LOG).items() if n.endswith(".wal") or n == "META"}


def backup_files(disk: SimulatedDisk) -> dict[str, bytes]:
    names = [n for n in disk.listdir(LOG) if n.startswith("broken-")]
    assert len(names) <= 1, names
    return disk.files(posixpath.join(LOG, names[0])) if names else {}


async def opened(disk: SimulatedDisk) -> tuple[list[walasync.Record], int]:
    async with walasync.open(LOG, io=disk) as wal:
        return [r async for r in wal.read()], wal.first_lsn


async def check_image(disk: SimulatedDisk, before: dict[str, bytes], keep: int) -> None:
    """The image is untouched, or the backup holds every file that is not as it was and
    the log opens with records 1 to `keep`."""
    now = log_files(disk)
    if now == before:
        return
    saved = backup_files(disk)
    for name, old in before.items():
        if now.get(name) != old:
            assert saved.get(name) == old, f"{name} changed and is not in the backup"
    records, first = await opened(disk)
    assert first == 1
    assert records == [walasync.Record(i, data(i)) for i in range(1, keep + 1)], (
        f"recovered LSN 1 to {len(records)}, not 1 to {keep}"
    )
    assert (await asyncio.to_thread(walasync.verify, LOG, io=disk)).ok  # blocking: a thread


@pytest.mark.parametrize("case", list(CASES))
def test_a_crash_at_every_step_of_a_repair(case: str) -> None:
    files = dict(BASE)
    CASES[case](files)
    disk = SimulatedDisk.from_files({posixpath.join(LOG, n): d for n, d in files.items()})
    before = log_files(disk)
    found = walasync.verify(LOG, io=disk).problem
    assert found is not None
    keep = found.lsn - 1 if case != "damaged META" else RECORDS

    images: dict[tuple[tuple[tuple[str, bytes], ...], ...], SimulatedDisk] = {}
    rng = random.Random(case)

    def capture(step: int, op: str) -> None:
        for mode in MODES:
            image = disk.crash(mode, rng)
            key = (
                tuple(sorted(image.files(LOG).items())),
                tuple(sorted(backup_files(image).items())),
            )
            images.setdefault(key, image)

    disk.on_step = capture
    report = walasync.repair(LOG, io=disk)
    disk.on_step = None
    assert report.problems[0] == found
    assert report.last_lsn == keep and report.cut_from == (
        0 if case == "damaged META" else found.lsn
    )
    assert len(images) >= 3

    async def check_all() -> None:
        await check_image(disk.crash(), before, keep)  # the whole repair, then a power loss
        for image in images.values():
            await check_image(image, before, keep)

    run("asyncio", check_all())


def test_a_repair_then_appends_survive_a_power_loss() -> None:
    """The repaired log takes appends: durable, after the cut."""
    files = dict(BASE)
    CASES["bad batch in a sealed segment"](files)
    disk = SimulatedDisk.from_files({posixpath.join(LOG, n): d for n, d in files.items()})
    report = walasync.repair(LOG, io=disk)

    async def append() -> int:
        async with walasync.open(LOG, io=disk, segment_size=4096) as wal:
            return await wal.append(b"after the repair")

    assert run("asyncio", append()) == report.last_lsn + 1
    records, _ = run("asyncio", opened(disk.crash()))
    assert records[-1] == walasync.Record(report.last_lsn + 1, b"after the repair")


def test_damage_below_the_first_lsn() -> None:
    """In a sealed segment, below the first LSN: a bad payload is harmless (readers only
    hop headers there, as verify does); a bad header stops every read, and repair refuses
    to cut there, since that would leave no log."""
    disk = SimulatedDisk.from_files({}, dirs=[ROOT])

    async def write() -> int:
        async with walasync.open(LOG, io=disk, segment_size=4096) as wal:
            for i in range(1, RECORDS + 1):
                await wal.append(data(i))
            await wal.truncate_front(int(SEGMENTS[1][:-4]) + 5)  # inside the second one
            return wal.first_lsn

    first = run("asyncio", write())
    files = disk.files(LOG)
    name = min(n for n in files if n.endswith(".wal"))
    assert int(name[:-4]) < first

    def damaged(offset: int) -> SimulatedDisk:
        raw = bytearray(files[name])
        raw[offset] ^= 1
        return SimulatedDisk.from_files(
            {posixpath.join(LOG, n): bytes(raw) if n == name else d for n, d in files.items()}
        )

    harmless = damaged(32 + 24 + 1)  # the payload of the segment's first batch
    assert walasync.verify(LOG, io=harmless).ok
    records, _ = run("asyncio", opened(harmless))
    assert records == [walasync.Record(i, data(i)) for i in range(first, RECORDS + 1)]

    fatal = damaged(32)  # that batch's magic
    problem = walasync.verify(LOG, io=fatal).problem
    assert problem is not None and problem.offset == 32 and problem.lsn < first
    with pytest.raises(walasync.CorruptionError) as read_error:
        run("asyncio", opened(fatal))
    assert (read_error.value.path, read_error.value.offset) == (problem.path, problem.offset)
    before = log_files(fatal)
    with pytest.raises(walasync.CorruptionError, match="repair cannot cut there"):
        walasync.repair(LOG, io=fatal)
    assert log_files(fatal) == before

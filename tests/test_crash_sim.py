"""Crash simulation: power loss before every step of a workload, recovered with the real code.

Each workload runs once on a `SimulatedDisk` whose step hook takes, before every mutating
call k, the images a power loss would leave (`crash()` in the modes "drop", "prefix",
"torn" and "reorder", two samples of each random one) with the highest LSN acknowledged by
then. Then, for each distinct image, a log is opened on it with the real recovery code and
checked:

- opening succeeds: in the default (FSYNC) durability a crash never leaves corruption;
- LSNs are dense from 1 to `last_lsn`, and each record is, byte for byte, the one the
  workload appended at that LSN: nothing appears that was never appended, in another order;
- every append acknowledged before step k is there (`last_lsn` is at least its LSN);
- the log ends at the end of a unit: `append_many` is all or nothing;
- the recovered log takes new appends (the first 3/4 of a segment, so it usually rotates and
  a torn tail left in place would be sealed into a segment), and they and everything before
  survive a second crash; for a sample of images, a second power loss is simulated before
  every step of that second run too (recovery included).

Workloads: many concurrent appenders, `append_many` units, rotation across segments, close
and reopen, one unit per batch, and seeded random ones (WALASYNC_CRASH_CASES random
workloads per event loop, default 16; WALASYNC_CRASH_SEED picks another set). Then
INTERVAL durability (what was synced survives), injected I/O errors followed by a reopen and
a power loss, a process crash (the page cache survives) followed by a power loss, and a log
whose parent directories are new.

These are sync tests that run each workload on both event loops themselves: the images are
many and cheap, and the heavy part (recovering them) runs on one loop per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import loops, run

import walasync
from walasync.testing import SimulatedDisk

ROOT = "/data"
LOG = "/data/log"
MODES = ("drop", "prefix", "torn", "reorder")
CASES = int(os.environ.get("WALASYNC_CRASH_CASES", "16"))
SEED = int(os.environ.get("WALASYNC_CRASH_SEED", "0"))
NESTED = 2  # images per workload whose second run is crashed at every step
SAMPLES = 2  # images per step for each random mode
SHOW = 5  # failures quoted in a failure message


# -- what a run did ----------------------------------------------------------------------------


@dataclass
class History:
    """What one run on a disk appended, and when appends were acknowledged.

    `records` maps each LSN whose record is known to its data: every LSN a run without
    faults assigned, including the `base` records the log held when the run began. A
    crash image may hold any prefix of that log that ends at a unit's end and reaches its
    floor (the highest LSN acknowledged, or in INTERVAL mode synced, before the crash)."""

    base: int = 0
    records: dict[int, bytes] = field(default_factory=dict)
    unit_end: dict[int, int] = field(default_factory=dict)  # LSN -> last LSN of its unit
    top: int = 0  # highest LSN acknowledged so far
    attempted: set[bytes] = field(default_factory=set)  # every record passed to append
    faults: bool = False  # unacknowledged records' LSNs are unknown

    def start(self, records: list[bytes]) -> None:
        """The log holds `records` (all durable) when the run begins."""
        self.base = len(records)
        for lsn, data in enumerate(records, 1):
            self.records[lsn] = data
            self.unit_end[lsn] = self.base
        self.attempted.update(records)

    def ack(self, first: int, datas: list[bytes]) -> None:
        last = first + len(datas) - 1
        for lsn, data in enumerate(datas, first):
            assert lsn not in self.records, f"LSN {lsn} acknowledged twice"
            self.records[lsn] = data
            self.unit_end[lsn] = last
        self.top = max(self.top, last)


@dataclass
class Image:
    """The disk a power loss before step `step` would leave, and the LSN it must reach."""

    step: int
    op: str
    mode: str
    disk: SimulatedDisk
    floor: int  # every LSN up to this one was acknowledged (or synced) before the step

    def __str__(self) -> str:
        return f"power loss before step {self.step} ({self.op}), mode {self.mode}"


class Session:
    """Runs a workload on a disk, recording appends and taking crash images at every step
    (`SAMPLES` of them per random mode)."""

    def __init__(
        self,
        disk: SimulatedDisk,
        opts: dict[str, Any],
        modes: tuple[str, ...] = MODES,
        seed: int = 0,
    ) -> None:
        self.disk = disk
        self.opts = opts
        self.history = History()
        self.images: list[Image] = []
        self.wal: walasync.Wal | None = None  # the log open now, for `floor`
        self.modes = modes
        self._rng = random.Random(seed)
        disk.on_step = self._capture

    def floor(self) -> int:
        """The LSN a crash now must keep: the highest acknowledged (FSYNC mode) or synced."""
        if self.opts.get("durability", "fsync") == "fsync":
            return self.history.top
        return max(self.history.base, self.wal.synced_lsn if self.wal is not None else 0)

    def _capture(self, step: int, op: str) -> None:
        floor = self.floor()
        for mode in self.modes:
            for _ in range(1 if mode in ("drop", "process") else SAMPLES):
                image = self.disk.crash(mode, self._rng)
                self.images.append(Image(step, op, mode, image, floor))

    async def open(self) -> walasync.Wal:
        self.wal = await walasync.open(LOG, io=self.disk, **self.opts)
        return self.wal

    async def append(self, wal: walasync.Wal, data: bytes) -> bool:
        """Append; False if an injected fault failed it (the log broke, or the batch could
        not get its new segment and was not written)."""
        self.history.attempted.add(data)
        try:
            lsn = await wal.append(data)
        except walasync.WalError:
            return False
        self.history.ack(lsn, [data])
        return True

    async def append_many(self, wal: walasync.Wal, datas: list[bytes]) -> bool:
        self.history.attempted.update(datas)
        try:
            lsns = await wal.append_many(datas)
        except walasync.WalError:
            return False
        assert len(lsns) == len(datas)
        if datas:
            self.history.ack(lsns.start, datas)
        return True

    def stop(self) -> None:
        self.disk.on_step = None


def distinct(images: list[Image]) -> list[Image]:
    """One image per distinct disk (and mode): the one with the highest floor."""
    best: dict[tuple[str, tuple[tuple[str, bytes | None], ...]], Image] = {}
    for image in images:
        key = (image.mode, tree(image.disk))
        if key not in best or best[key].floor < image.floor:
            best[key] = image
    return sorted(best.values(), key=lambda i: (i.step, i.mode))


def tree(disk: SimulatedDisk, top: str = "/") -> tuple[tuple[str, bytes | None], ...]:
    """Every path on the disk with its contents (None for a directory)."""
    out: list[tuple[str, bytes | None]] = []
    stack = [top]
    while stack:
        path = stack.pop()
        files = disk.files(path)
        for name in disk.listdir(path):
            child = posixpath.join(path, name)
            out.append((child, files.get(name)))
            if name not in files:
                stack.append(child)
    return tuple(sorted(out))


# -- checks --------------------------------------------------------------------------------------


async def read_all(wal: walasync.Wal) -> list[walasync.Record]:
    return [r async for r in wal.read()]


async def failure_of(check: Awaitable[object]) -> str | None:
    """What `check` raised (a failed assertion or a WalError), as text; None if it passed."""
    try:
        await check
    except (AssertionError, walasync.WalError) as exc:
        return repr(exc)
    return None


async def check_recovered(
    disk: SimulatedDisk, opts: dict[str, Any], history: History, floor: int
) -> None:
    async with walasync.open(LOG, io=disk, **opts) as wal:
        check_log(await read_all(wal), wal.last_lsn, history, floor)


def check_log(records: list[walasync.Record], last: int, history: History, floor: int) -> None:
    """Raise AssertionError unless `records` (all of a recovered log) fit `history` and
    reach LSN `floor`."""
    lsns = [r.lsn for r in records]
    assert lsns == list(range(1, last + 1)), f"LSNs not dense 1..{last}: {lsns[:10]}..."
    assert last >= history.base, f"records held before the run were lost: {last} < {history.base}"
    assert last >= floor, f"acknowledged LSN {floor} lost: the log ends at {last}"
    for lsn, data in records:
        if lsn in history.records:
            assert data == history.records[lsn], f"LSN {lsn} holds other bytes ({len(data)} B)"
        else:
            assert history.faults, f"LSN {lsn} was never appended"
            assert data in history.attempted, f"LSN {lsn} holds bytes never appended"
    end = history.unit_end.get(last)
    assert end in (None, last), f"the log ends at {last}, inside a unit ending at {end}"


def follow_up(segment_size: int, seed: int) -> list[bytes | list[bytes]]:
    """Appends for a recovered log: one about 3/4 of a segment (so it likely rotates, and a
    torn tail left in place would be sealed into a segment), an empty one, a unit."""
    rng = random.Random(seed)
    return [
        b"follow:big|" + rng.randbytes(segment_size * 3 // 4),
        b"",
        [b"follow:unit1|" + rng.randbytes(rng.randrange(300)), b"follow:unit2|"],
        b"follow:small|" + rng.randbytes(rng.randrange(100)),
    ]


async def append_items(
    session: Session, wal: walasync.Wal, items: list[bytes | list[bytes]]
) -> None:
    for item in items:
        if isinstance(item, bytes):
            ok = await session.append(wal, item)
        else:
            ok = await session.append_many(wal, item)
        assert ok


async def verify(image: Image, history: History, opts: dict[str, Any], seed: int) -> None:
    """Recover from a copy of `image` and check it; append, crash again, recover and check
    again."""
    disk = image.disk.crash()  # a copy: an image holds only durable state
    try:
        wal = await walasync.open(LOG, io=disk, **opts)
    except walasync.WalError as exc:
        raise AssertionError(f"open failed: {exc!r}") from exc
    try:
        records = await read_all(wal)
        check_log(records, wal.last_lsn, history, image.floor)
        after = History(faults=history.faults, attempted=set(history.attempted))
        after.start([r.data for r in records])
        session = Session(disk, opts, modes=())
        session.history = after
        await append_items(session, wal, follow_up(opts["segment_size"], seed))
        await wal.sync()  # a no-op in FSYNC mode
        again = disk.crash(image.mode, random.Random(seed))
    finally:
        await wal.close()
    try:
        wal = await walasync.open(LOG, io=again, **opts)
    except walasync.WalError as exc:
        raise AssertionError(f"reopen after the second crash failed: {exc!r}") from exc
    async with wal:
        records = await read_all(wal)
        check_log(records, wal.last_lsn, after, after.top)
        assert wal.last_lsn == after.top, "the follow-up appends were not all kept"


async def recover_and_follow_up(session: Session, history: History, floor: int, seed: int) -> None:
    """Recover the session's disk, check it against `history`, then append the follow-up
    (recorded in the session's own history, which starts from what was recovered)."""
    async with await session.open() as wal:
        records = await read_all(wal)
        check_log(records, wal.last_lsn, history, floor)
        session.history.faults = history.faults
        session.history.attempted = set(history.attempted)
        session.history.start([r.data for r in records])
        await append_items(session, wal, follow_up(session.opts["segment_size"], seed))


async def explore_second_run(
    image: Image, history: History, opts: dict[str, Any], modes: tuple[str, ...], seed: int
) -> tuple[int, list[str]]:
    """Recover a copy of `image` and append, taking crash images before every step of that
    (recovery included); check each. Returns (images checked, failures)."""
    session = Session(image.disk.crash(), opts, modes, seed)  # a copy: images are durable
    error = await failure_of(recover_and_follow_up(session, history, image.floor, seed))
    session.stop()
    if error is not None:
        return 1, [f"{image}, recovering it to crash it again: {error}"]
    failures = []
    nested = distinct(session.images)
    for inner in nested:
        error = await failure_of(check_recovered(inner.disk, opts, session.history, inner.floor))
        if error is not None:
            failures.append(f"{image}, then in its recovery run: {inner}: {error}")
    return len(nested), failures


async def check_images(session: Session, seed: int, nested: int = NESTED) -> int:
    """Verify every distinct image of a finished session; fail listing what failed.
    Returns the number of images checked."""
    session.stop()
    images = distinct(session.images)
    assert images, "no step was taken"
    rng = random.Random(seed)
    failures: list[str] = []
    for image in images:
        error = await failure_of(
            verify(image, session.history, session.opts, rng.randrange(1 << 30))
        )
        if error is not None:
            failures.append(f"{image}: {error}")
    checked = len(images)
    torn = [i for i in images if i.mode in ("torn", "reorder")] or images
    for image in rng.sample(torn, min(nested, len(torn))):
        count, more = await explore_second_run(
            image, session.history, session.opts, session.modes, rng.randrange(1 << 30)
        )
        checked += count
        failures += more
    if failures:
        shown = "\n".join(failures[:SHOW])
        pytest.fail(f"{len(failures)} of {checked} crash images failed (seed {seed}):\n{shown}")
    return checked


def simulate(
    loop: str,
    opts: dict[str, Any],
    workload: Callable[[Session], Awaitable[None]],
    seed: int,
    nested: int = NESTED,
    modes: tuple[str, ...] = MODES,
) -> int:
    """Run `workload` once on a fresh disk, then verify every crash image it left."""

    async def main() -> int:
        session = Session(SimulatedDisk.from_files({}, dirs=[ROOT]), opts, modes, seed)
        await workload(session)
        return await check_images(session, seed, nested)

    return run(loop, main())


# -- payloads and workloads ------------------------------------------------------------------


def payload(tag: str, size: int, rng: random.Random) -> bytes:
    """A record of exactly `size` bytes, unique by its tag if it has room for it."""
    head = tag.encode() + b"|"
    if size < len(head):
        return b"" if size == 0 else rng.randbytes(size)
    return head + rng.randbytes(size - len(head))


def concurrent_appenders(
    n: int = 20, sizes: tuple[int, ...] = (0, 1, 7, 40, 150, 700)
) -> Callable[[Session], Awaitable[None]]:
    """`n` coroutines at once, each appending 2-4 records of the given sizes."""

    async def workload(s: Session) -> None:
        rng = random.Random(1)
        plans = [
            [payload(f"a{i}.{j}", rng.choice(sizes), rng) for j in range(rng.randint(2, 4))]
            for i in range(n)
        ]
        async with await s.open() as wal:

            async def appender(records: list[bytes]) -> None:
                for data in records:
                    assert await s.append(wal, data)
                    if rng.random() < 0.5:
                        await asyncio.sleep(0)

            await asyncio.gather(*(appender(p) for p in plans))

    return workload


async def units(s: Session) -> None:
    rng = random.Random(2)
    async with await s.open() as wal:

        async def appender(i: int) -> None:
            for j in range(3):
                if rng.random() < 0.7:
                    unit = [
                        payload(f"u{i}.{j}.{k}", rng.choice((0, 5, 60, 300)), rng)
                        for k in range(rng.randint(0, 5))
                    ]
                    assert await s.append_many(wal, unit)
                else:
                    assert await s.append(wal, payload(f"s{i}.{j}", rng.randint(0, 200), rng))

        await asyncio.gather(*(appender(i) for i in range(12)))


async def rotation(s: Session) -> None:
    rng = random.Random(3)
    async with await s.open() as wal:

        async def appender(i: int) -> None:
            for j in range(rng.randint(3, 6)):
                assert await s.append(wal, payload(f"r{i}.{j}", rng.randint(100, 1500), rng))

        await asyncio.gather(*(appender(i) for i in range(5)))
        for j in range(4):  # one record per batch too
            assert await s.append(wal, payload(f"seq{j}", rng.randint(100, 1500), rng))


async def reopen(s: Session) -> None:
    rng = random.Random(4)
    for phase in range(3):
        async with await s.open() as wal:
            assert wal.last_lsn == s.history.top

            async def appender(i: int, phase: int = phase) -> None:
                for j in range(3):
                    data = payload(f"p{phase}.{i}.{j}", rng.randint(0, 1200), rng)
                    if j == 1:
                        assert await s.append_many(wal, [data, b"", data[:10]])
                    else:
                        assert await s.append(wal, data)

            await asyncio.gather(*(appender(i) for i in range(4)))


def random_workload(seed: int) -> tuple[dict[str, Any], Callable[[Session], Awaitable[None]]]:
    """A seeded random workload: segment size, phases (closed and reopened between),
    concurrency, record sizes, and the append / append_many mix."""
    rng = random.Random(seed)
    segment = rng.choice((4096, 4096, 8192, 16384))
    opts: dict[str, Any] = {"segment_size": segment}
    if rng.random() < 0.3:
        opts["max_batch_bytes"] = rng.choice((512, 2048, 8192))
    phases = rng.choice((1, 1, 2, 3))
    budget = rng.randint(segment, 4 * segment)  # bytes per phase, about

    def size() -> int:
        r = rng.random()
        if r < 0.1:
            return 0
        if r < 0.6:
            return rng.randint(1, 64)
        if r < 0.95:
            return rng.randint(64, 1024)
        return rng.randint(segment // 2, segment + 100)

    plan: list[list[list[bytes | list[bytes]]]] = []  # phase -> appender -> items
    for p in range(phases):
        appenders: list[list[bytes | list[bytes]]] = [[] for _ in range(rng.randint(1, 24))]
        total = 0
        while total < budget:
            items = rng.choice(appenders)
            tag = f"w{p}.{total}"
            item: bytes | list[bytes]
            if rng.random() < 0.25:
                item = [payload(f"{tag}.{k}", size(), rng) for k in range(rng.randint(0, 4))]
                total += sum(map(len, item)) + 8
            else:
                item = payload(tag, size(), rng)
                total += len(item) + 8
            items.append(item)
        plan.append(appenders)
    yields = rng.random()

    async def workload(s: Session) -> None:
        for appenders in plan:
            async with await s.open() as wal:

                async def appender(items: list[bytes | list[bytes]]) -> None:
                    for item in items:
                        if isinstance(item, bytes):
                            assert await s.append(wal, item)
                        else:
                            assert await s.append_many(wal, item)
                        if rng.random() < yields:
                            await asyncio.sleep(0)

                await asyncio.gather(*(appender(a) for a in appenders))

    return opts, workload


# -- the scripted and random workloads ---------------------------------------------------------


@loops
def test_crash_at_every_step_of_concurrent_appends(loop: str) -> None:
    simulate(loop, {"segment_size": 4096}, concurrent_appenders(), seed=11)


@loops
def test_crash_at_every_step_of_append_many_units(loop: str) -> None:
    simulate(loop, {"segment_size": 4096}, units, seed=12)


@loops
def test_crash_at_every_step_of_rotations(loop: str) -> None:
    simulate(loop, {"segment_size": 4096}, rotation, seed=13)


@loops
def test_crash_at_every_step_of_close_and_reopen(loop: str) -> None:
    simulate(loop, {"segment_size": 4096}, reopen, seed=14)


@loops
def test_crash_at_every_step_of_a_log_with_one_small_batch_at_a_time(loop: str) -> None:
    """max_batch_bytes below most records: every batch is one unit."""
    simulate(loop, {"segment_size": 4096, "max_batch_bytes": 64}, concurrent_appenders(6), seed=15)


@loops
@pytest.mark.parametrize("case", range(CASES))
def test_crash_at_every_step_of_random_workloads(loop: str, case: int) -> None:
    seed = SEED * 1_000_003 + case
    opts, workload = random_workload(seed)
    simulate(loop, opts, workload, seed=seed, nested=1)


@loops
def test_crash_at_every_step_in_interval_mode(loop: str) -> None:
    """Durability.INTERVAL: what was synced (`synced_lsn`, advanced by the background
    fdatasync and by `sync()`) survives; a crash that keeps unsynced writes in order (drop,
    prefix, torn) leaves a log that opens. (Reordered writes may legitimately leave a valid
    batch after a lost one, which open reports as corruption: see README.)"""

    async def workload(s: Session) -> None:
        rng = random.Random(6)
        async with await s.open() as wal:

            async def appender(i: int) -> None:
                for j in range(5):
                    assert await s.append(wal, payload(f"i{i}.{j}", rng.randint(0, 1200), rng))
                    if rng.random() < 0.25:
                        await wal.sync()
                    elif rng.random() < 0.3:
                        await asyncio.sleep(0.002)

            await asyncio.gather(*(appender(i) for i in range(6)))

    opts = {"segment_size": 4096, "durability": "interval", "sync_interval": 0.001}
    simulate(loop, opts, workload, seed=16, modes=("drop", "prefix", "torn"))


# -- injected I/O errors, then a power loss ---------------------------------------------------


@loops
@pytest.mark.parametrize(
    ("op", "nth"),
    [
        ("write", 3),
        ("write", 9),
        ("short_write", 5),
        ("short_write", 8),
        ("fdatasync", 4),
        ("fdatasync", 12),
        ("rename", 2),
        ("fsync_dir", 3),
        ("open", 4),
    ],
)
def test_acknowledged_records_survive_an_io_error_then_a_power_loss(
    loop: str, op: str, nth: int
) -> None:
    """An I/O error breaks the log; the application closes it and reopens (the same disk,
    as after a restart without power loss), appends more, and then the power fails at any
    step: every acknowledged record must be there. (A short write keeps 100 bytes of the
    nth write, then fails with EIO.)"""

    async def workload(s: Session) -> None:
        s.history.faults = True
        if op == "short_write":
            s.disk.short_write(nth, 100)
        else:
            s.disk.fail_at(op, nth, errno.EIO)
        rng = random.Random(nth)
        for phase in range(2):
            try:
                wal = await s.open()
            except walasync.WalError:
                wal = await s.open()  # the injected error hit the open: try again
            async with wal:

                async def appender(i: int, phase: int = phase, wal: walasync.Wal = wal) -> None:
                    for j in range(4):
                        data = payload(f"f{phase}.{i}.{j}", rng.randint(50, 1500), rng)
                        if not await s.append(wal, data):
                            return

                await asyncio.gather(*(appender(i) for i in range(4)))

    simulate(loop, {"segment_size": 4096}, workload, seed=nth, nested=1)


# -- a process crash (SIGKILL: the page cache survives), then a power loss ----------------------


@loops
@pytest.mark.parametrize("appends", [True, False], ids=["appending", "reading"])
def test_process_crash_then_power_loss(loop: str, appends: bool) -> None:
    """The writer is killed before some step (its writes stay in the page cache, unsynced);
    the log is reopened from that state and, if `appends`, takes new appends; then the power
    fails. What the reopened log acknowledged (appending), or reported as `last_lsn` and
    returned from `read` (reading; durable in FSYNC mode, as `Wal.last_lsn` says), must
    survive the power loss."""

    opts: dict[str, Any] = {"segment_size": 4096}

    async def reopen_then_lose_power(image: Image, history: History) -> None:
        async with walasync.open(LOG, io=image.disk, **opts) as wal:
            records = await read_all(wal)
            check_log(records, wal.last_lsn, history, image.floor)
            after = History(attempted=set(history.attempted))
            after.start([r.data for r in records])
            if appends:
                follow = Session(image.disk, opts, modes=())
                follow.history = after
                await append_items(follow, wal, follow_up(4096, image.step))
        power_loss = image.disk.crash()
        await check_recovered(power_loss, opts, after, after.top)

    async def main() -> None:
        session = Session(SimulatedDisk.from_files({}, dirs=[ROOT]), opts, modes=("process",))
        await rotation(session)
        session.stop()
        failures: list[str] = []
        for image in distinct(session.images):
            error = await failure_of(reopen_then_lose_power(image, session.history))
            if error is not None:
                failures.append(f"killed before step {image.step} ({image.op}): {error}")
        if failures:
            shown = "\n".join(failures[:SHOW])
            pytest.fail(f"{len(failures)} process-crash images failed:\n{shown}")

    run(loop, main())


async def test_new_parent_directories_are_durable() -> None:
    """`open` creates missing parents of the log directory (like `mkdir -p`); a power loss
    after acknowledged appends must not take the directories, and the log, away."""
    disk = SimulatedDisk()  # only "/" exists
    async with walasync.open("/srv/wal/log", io=disk, segment_size=4096) as wal:
        assert await wal.append(b"acknowledged") == 1
    async with walasync.open("/srv/wal/log", io=disk.crash(), segment_size=4096) as wal:
        assert [r.data for r in await read_all(wal)] == [b"acknowledged"]


@loops
def test_a_lost_last_segment_is_never_silent_at_any_crash_point_of_rotation(loop: str) -> None:
    """Recover each crash image of a rotating workload, then lose its last segment file:
    the next open either reports the loss (CorruptionError naming the missing file) or
    finds every LSN the log had, so that no acknowledged LSN is ever handed out again."""
    opts: dict[str, Any] = {"segment_size": 4096}

    async def last_lsn(disk: SimulatedDisk) -> int:
        async with walasync.open(LOG, io=disk, **opts) as wal:
            return int(wal.last_lsn)

    async def main() -> tuple[int, int]:
        session = Session(SimulatedDisk.from_files({}, dirs=[ROOT]), opts, ("drop", "torn"), 13)
        await rotation(session)
        session.stop()
        reported = checked = 0
        for image in distinct(session.images):
            disk = image.disk.crash()
            before = await last_lsn(disk)
            names = sorted(n for n in disk.listdir(LOG) if n.endswith(".wal"))
            if len(names) < 2:
                continue
            checked += 1
            disk.unlink(posixpath.join(LOG, names[-1]))
            try:
                after = await last_lsn(disk)
            except walasync.CorruptionError as exc:
                assert exc.path == posixpath.join(LOG, names[-1]), f"{image}: {exc}"
                reported += 1
            else:
                assert after >= before, f"{image}: LSNs {after + 1}..{before} would be reused"
        return reported, checked

    reported, checked = run(loop, main())
    assert checked > 20 and reported > 0


# -- truncation ----------------------------------------------------------------------------------


class CutSession(Session):
    """A session that also records, for each image, the truncation it must show at least
    (the last `truncate_front` that returned) and at most (the last one begun)."""

    def __init__(self, disk: SimulatedDisk, opts: dict[str, Any], seed: int) -> None:
        super().__init__(disk, opts, ("drop", "torn", "reorder"), seed)
        self.cut_done = 1
        self.cut_begun = 1
        self.cuts: list[tuple[int, int]] = []  # per image: (done, begun)

    def _capture(self, step: int, op: str) -> None:
        before = len(self.images)
        super()._capture(step, op)
        self.cuts += [(self.cut_done, self.cut_begun)] * (len(self.images) - before)

    async def truncate_front(self, wal: walasync.Wal, lsn: int) -> None:
        self.cut_begun = max(self.cut_begun, lsn)
        await wal.truncate_front(lsn)
        self.cut_done = max(self.cut_done, lsn)


async def truncating(s: CutSession) -> None:
    rng = random.Random(6)
    async with await s.open() as wal:
        for phase in range(3):

            async def appender(i: int, phase: int = phase) -> None:
                for j in range(rng.randint(2, 5)):
                    data = payload(f"t{phase}.{i}.{j}", rng.randint(50, 900), rng)
                    assert await s.append(wal, data)

            await asyncio.gather(*(appender(i) for i in range(4)))
            await s.truncate_front(wal, rng.randint(wal.first_lsn, wal.last_lsn))
        await s.truncate_front(wal, wal.last_lsn + 1)  # everything
        assert await s.append(wal, b"after everything")


@loops
def test_crash_at_every_step_of_truncate_front(loop: str) -> None:
    """No crash brings a truncated record back once truncate_front returned, none at or
    above the cut is lost, and first_lsn never passes a cut that was not asked for."""
    opts: dict[str, Any] = {"segment_size": 4096}

    async def check(image: Image, cut: tuple[int, int], history: History) -> None:
        done, begun = cut
        async with walasync.open(LOG, io=image.disk.crash(), **opts) as wal:
            first, last = wal.first_lsn, wal.last_lsn
            assert done <= first <= begun, f"first_lsn {first} outside {done}..{begun}"
            records = [r async for r in wal.read()]
            if first > 1:
                with pytest.raises(walasync.TruncatedError):
                    wal.read(first - 1)
        assert last >= image.floor, f"acknowledged LSN {image.floor} lost (last {last})"
        assert [r.lsn for r in records] == list(range(first, last + 1))
        for lsn, data in records:
            assert data == history.records[lsn], f"LSN {lsn} holds other bytes"

    async def main() -> int:
        session = CutSession(SimulatedDisk.from_files({}, dirs=[ROOT]), opts, 21)
        await truncating(session)
        session.stop()
        failures = []
        for image, cut in zip(session.images, session.cuts, strict=True):
            error = await failure_of(check(image, cut, session.history))
            if error is not None:
                failures.append(f"{image}: {error}")
        assert not failures, "\n".join(failures[:SHOW])
        return len(session.images)

    assert run(loop, main()) > 100


class BackCutSession(Session):
    """A session whose log is cut back: LSNs are reused, so it keeps, for each image, the
    logs a recovery may show: the acknowledged log (with records appended since the last
    cut and not yet acknowledged), and during a cut also the log as the cut leaves it."""

    def __init__(self, disk: SimulatedDisk, opts: dict[str, Any], seed: int) -> None:
        super().__init__(disk, opts, ("drop", "torn", "reorder"), seed)
        self.log: dict[int, bytes] = {}
        self.unit_end: dict[int, int] = {}
        self.since_cut: set[bytes] = set()  # appended since the last cut returned
        self.cutting: int | None = None
        self.states: list[list[tuple[dict[int, bytes], frozenset[bytes]]]] = []

    def _capture(self, step: int, op: str) -> None:
        before = len(self.images)
        super()._capture(step, op)
        states = [(dict(self.log), frozenset(self.since_cut))]
        if self.cutting is not None:
            kept = {lsn: data for lsn, data in self.log.items() if lsn <= self.cutting}
            states.append((kept, frozenset()))
        self.states += [states] * (len(self.images) - before)

    async def add(self, wal: walasync.Wal, datas: list[bytes]) -> None:
        self.since_cut.update(datas)
        lsns = await wal.append_many(datas) if len(datas) > 1 else [await wal.append(datas[0])]
        for lsn, data in zip(lsns, datas, strict=True):
            self.log[lsn] = data
            self.unit_end[lsn] = lsns[-1]

    async def truncate_back(self, wal: walasync.Wal, lsn: int) -> None:
        self.cutting = lsn
        await wal.truncate_back(lsn)
        self.log = {k: v for k, v in self.log.items() if k <= lsn}
        self.since_cut = set()
        self.cutting = None


async def cutting_back(s: BackCutSession) -> None:
    rng = random.Random(8)
    async with await s.open() as wal:
        for phase in range(3):

            async def appender(i: int, phase: int = phase) -> None:
                for j in range(rng.randint(2, 4)):
                    n = 1 if rng.random() < 0.7 else rng.randint(2, 3)
                    tags = [f"b{phase}.{i}.{j}.{k}" for k in range(n)]
                    await s.add(wal, [payload(t, rng.randint(30, 700), rng) for t in tags])

            await asyncio.gather(*(appender(i) for i in range(4)))
            ends = [lsn for lsn, end in s.unit_end.items() if lsn == end and lsn in s.log]
            await s.truncate_back(wal, rng.choice([0, *ends]))
        await s.add(wal, [b"after the cuts"])


@loops
def test_crash_at_every_step_of_truncate_back(loop: str) -> None:
    """A crash at any step of a cut recovers the log before the cut or after it; never a
    record that was both reported removed and present, never a lost one at or below it."""
    opts: dict[str, Any] = {"segment_size": 4096}

    def fits(
        records: list[walasync.Record], log: dict[int, bytes], extra: frozenset[bytes]
    ) -> bool:
        if records and records[-1].lsn < max(log, default=0):
            return False
        if not records and log:
            return False
        return all(data == log[lsn] if lsn in log else data in extra for lsn, data in records)

    async def check(image: Image, states: list[tuple[dict[int, bytes], frozenset[bytes]]]) -> None:
        async with walasync.open(LOG, io=image.disk.crash(), **opts) as wal:
            records = [r async for r in wal.read()]
            last = wal.last_lsn
        assert [r.lsn for r in records] == list(range(1, last + 1)), "LSNs not dense"
        assert any(fits(records, log, extra) for log, extra in states), (
            f"recovered log (last {last}) fits no state the cut allows"
        )

    async def main() -> int:
        session = BackCutSession(SimulatedDisk.from_files({}, dirs=[ROOT]), opts, 22)
        await cutting_back(session)
        session.stop()
        failures = []
        for image, states in zip(session.images, session.states, strict=True):
            error = await failure_of(check(image, states))
            if error is not None:
                failures.append(f"{image}: {error}")
        assert not failures, "\n".join(failures[:SHOW])
        return len(session.images)

    assert run(loop, main()) > 100


# -- retention -----------------------------------------------------------------------------------


class RetentionSession(Session):
    """A session whose log drops segments by retention (`retention_bytes`, then
    `retention_age`), after rotations and in `apply_retention`, through an `on_segment_drop`
    hook that archives most segments (a copy read on a thread, as an archiver would), vetoes
    some and fails now and then. For each image it keeps the bounds of `first_lsn`: at
    least the log's own when the step came (set once META is durable), at most one past
    the last segment the hook let go."""

    def __init__(
        self, disk: SimulatedDisk, opts: dict[str, Any], modes: tuple[str, ...], seed: int
    ) -> None:
        super().__init__(disk, opts, modes, seed)
        self.begun = 1  # the first_lsn that the last drop the hook let go makes
        self.bounds: list[tuple[int, int]] = []  # per image: (at least, at most)
        self.calls = 0
        self.archived: list[tuple[walasync.SegmentInfo, bytes]] = []
        self.problems: list[str] = []
        self.recycled = 0  # images with a freed segment waiting to be reused

    def _capture(self, step: int, op: str) -> None:
        before = len(self.images)
        super()._capture(step, op)
        done = self.wal.first_lsn if self.wal is not None else 1
        self.bounds += [(done, self.begun)] * (len(self.images) - before)
        with contextlib.suppress(FileNotFoundError):  # before the log's directory exists
            self.recycled += "recycle.tmp" in self.disk.files(LOG)

    async def open_retaining(self, **retention: float) -> walasync.Wal:
        opts: dict[str, Any] = {**self.opts, **retention}
        self.wal = await walasync.open(LOG, io=self.disk, on_segment_drop=self.hook, **opts)
        return self.wal

    def copy(self, path: str) -> bytes:
        fd = self.disk.open_read(path)
        try:
            return self.disk.pread(fd, self.disk.size(fd), 0)
        finally:
            self.disk.close(fd)

    async def hook(self, segment: walasync.SegmentInfo) -> bool | None:
        self.calls += 1
        wal = self.wal
        assert wal is not None
        if segment.last_lsn > wal.synced_lsn:
            self.problems.append(f"shown {segment}, not durable (synced_lsn {wal.synced_lsn})")
        if not segment.first_lsn <= wal.first_lsn:
            self.problems.append(f"shown {segment}, not the oldest (first_lsn {wal.first_lsn})")
        if self.calls % 5 == 2:
            return False  # keep it, and every later one, this time
        data = await asyncio.to_thread(self.copy, segment.path)
        if len(data) != segment.size:
            self.problems.append(f"shown {segment}, but the file holds {len(data)} bytes")
        if self.calls % 7 == 4:
            raise OSError("archive unreachable")  # the pass stops, the segment stays
        self.archived.append((segment, data))
        self.begun = max(self.begun, segment.last_lsn + 1)
        return None


async def retaining(s: RetentionSession) -> None:
    """Appenders rotating 4 KiB segments, with retention by bytes (three segments), then,
    reopened, by age (every sealed segment is old); `apply_retention` between rounds, and
    (in the relaxed modes) `sync`, without which nothing is durable enough to drop."""
    rng = random.Random(9)
    retentions: list[dict[str, float]] = [{"retention_bytes": 3 * 4096}, {"retention_age": 1e-9}]
    for phase, retention in enumerate(retentions):
        async with await s.open_retaining(**retention) as wal:
            for rnd in range(3):

                async def appender(i: int, tag: str = f"k{phase}.{rnd}") -> None:
                    for j in range(rng.randint(2, 5)):
                        data = payload(f"{tag}.{i}.{j}", rng.randint(50, 900), rng)
                        assert await s.append(wal, data)
                    if s.opts["durability"] != "fsync" and rng.random() < 0.5:
                        await wal.sync()

                await asyncio.gather(*(appender(i) for i in range(4)))
                with contextlib.suppress(OSError):  # the hook failed: the pass stopped
                    await wal.apply_retention()


@loops
@pytest.mark.parametrize("durability", ["fsync", "none"])
def test_crash_at_every_step_of_retention(loop: str, durability: str) -> None:
    """Retention drops (after rotations and in `apply_retention`, by bytes and by age,
    through a hook that archives, vetoes and fails) and recycles segments; a power loss
    at any step leaves a log whose `first_lsn` is at least what had been committed and at
    most where a drop the hook let go would put it; every acknowledged record from it on
    (FSYNC; in NONE mode, every synced one) is there, byte for byte, LSNs dense; nothing
    below it can be read, no segment file is wholly below it, and the log appends on.
    The hook is only shown durable segments, oldest first, whole. In NONE mode only
    "drop" images are checked (the others keep some unsynced writes of one file and lose
    those of an earlier one), and where a new segment survives the unsynced records before
    it, open reports the loss as README says the relaxed modes may: `walasync.repair`
    must then cut only records that were never synced."""
    opts: dict[str, Any] = {"segment_size": 4096, "durability": durability}
    modes = ("drop", "torn", "reorder") if durability == "fsync" else ("drop",)

    async def check(image: Image, bounds: tuple[int, int], history: History) -> None:
        done, begun = bounds
        disk = image.disk.crash()
        try:
            wal = await walasync.open(LOG, io=disk, segment_size=4096)
        except walasync.CorruptionError:
            if durability == "fsync":
                raise
            # Unsynced records lost before durable ones (a segment made after them, here):
            # what repair cuts to open the log again must never have been synced.
            report = await asyncio.to_thread(walasync.repair, LOG, io=disk)
            assert report.cut_from > image.floor, f"repair cut synced records: {report}"
            wal = await walasync.open(LOG, io=disk, segment_size=4096)
        async with wal:
            first, last = wal.first_lsn, wal.last_lsn
            assert done <= first <= begun, f"first_lsn {first} outside {done}..{begun}"
            assert first <= last + 1, f"first_lsn {first} above last_lsn {last} + 1"
            assert last >= image.floor, f"acknowledged LSN {image.floor} lost (last {last})"
            records = await read_all(wal)
            assert [r.lsn for r in records] == list(range(first, last + 1)), "LSNs not dense"
            for lsn, data in records:
                assert data == history.records[lsn], f"LSN {lsn} holds other bytes"
            if first > 1:
                with pytest.raises(walasync.TruncatedError):
                    wal.read(first - 1)
            firsts = sorted(int(n[:-4]) for n in disk.listdir(LOG) if n.endswith(".wal"))
            assert firsts[0] <= first and (len(firsts) == 1 or firsts[1] > first), (
                f"segment files {firsts[:3]}, first_lsn {first}"
            )
            big = await wal.append(bytes(3000))  # rotates
            assert [big, await wal.append(b"on")] == [last + 1, last + 2]
            assert [r.lsn for r in await read_all(wal)] == list(range(first, last + 3))

    async def main() -> int:
        session = RetentionSession(SimulatedDisk.from_files({}, dirs=[ROOT]), opts, modes, 23)
        await retaining(session)
        session.stop()
        assert not session.problems, session.problems[:SHOW]
        assert len(session.archived) >= 4 and session.recycled, "too few drops to test"
        # One check per distinct disk, with the tightest bounds of the images that left it.
        merged: dict[object, tuple[Image, tuple[int, int]]] = {}
        for image, (done, begun) in zip(session.images, session.bounds, strict=True):
            key = tree(image.disk)
            if key in merged:
                seen, (low, high) = merged[key]
                done, begun = max(done, low), min(begun, high)
                image = image if image.floor >= seen.floor else seen
            merged[key] = image, (done, begun)
        failures = []
        for image, bounds in merged.values():
            error = await failure_of(check(image, bounds, session.history))
            if error is not None:
                failures.append(f"{image}: {error}")
        assert not failures, "\n".join(failures[:SHOW])
        return len(merged)

    assert run(loop, main()) > (80 if durability == "fsync" else 15)


class OriginSession(Session):
    """A session that also records, for each image, whether `open` had returned."""

    def __init__(self, disk: SimulatedDisk, opts: dict[str, Any], seed: int) -> None:
        super().__init__(disk, opts, ("drop", "torn", "reorder"), seed)
        self.returned = False
        self.opened: list[bool] = []  # per image

    def _capture(self, step: int, op: str) -> None:
        before = len(self.images)
        super()._capture(step, op)
        self.opened += [self.returned] * (len(self.images) - before)


@loops
def test_crash_at_every_step_of_creating_a_log_at_first_lsn(loop: str) -> None:
    """`open(first_lsn=N)` of a new log, then appends across segments: a power loss
    before open returned leaves no log or an empty one that starts at N; one after leaves
    a log that starts at N and holds every acknowledged record. Either way the log opens
    with `first_lsn=None` (or N: another N is refused) and the next append gets the next
    LSN from N on."""
    origin = 2**40 + 7
    opts: dict[str, Any] = {"segment_size": 4096}

    async def workload(s: OriginSession) -> None:
        rng = random.Random(10)
        wal = s.wal = await walasync.open(LOG, io=s.disk, first_lsn=origin, **opts)
        s.returned = True
        async with wal:
            assert (wal.first_lsn, wal.last_lsn) == (origin, origin - 1)
            for j in range(12):
                assert await s.append(wal, payload(f"o{j}", rng.randint(100, 1500), rng))

    async def check(image: Image, returned: bool, history: History) -> None:
        disk = image.disk.crash()
        names = disk.listdir(LOG) if "log" in disk.listdir(ROOT) else []
        if not ("META" in names or any(n.endswith(".wal") for n in names)):
            assert not returned, "open had returned, and the log is gone"
            return
        with pytest.raises(ValueError, match="starts at LSN"):
            await walasync.open(LOG, io=disk, first_lsn=origin + 1, **opts)
        async with walasync.open(LOG, io=disk, **opts) as wal:
            first, last = wal.first_lsn, wal.last_lsn
            records = await read_all(wal)
        assert first == origin, f"the log starts at {first}, not {origin}"
        assert last >= max(image.floor, origin - 1), f"acknowledged LSN {image.floor} lost"
        assert [r.lsn for r in records] == list(range(origin, last + 1)), "LSNs not dense"
        for lsn, data in records:
            assert data == history.records[lsn], f"LSN {lsn} holds other bytes"
        async with walasync.open(LOG, io=disk, first_lsn=origin, **opts) as wal:
            assert await wal.append(b"next") == last + 1

    async def main() -> tuple[int, int]:
        session = OriginSession(SimulatedDisk.from_files({}, dirs=[ROOT]), opts, 24)
        await workload(session)
        session.stop()
        failures = []
        for image, returned in zip(session.images, session.opened, strict=True):
            error = await failure_of(check(image, returned, session.history))
            if error is not None:
                failures.append(f"{image}: {error}")
        assert not failures, "\n".join(failures[:SHOW])
        assert session.history.top >= origin + 11
        return len(session.images), session.opened.count(False)

    images, before_open = run(loop, main())
    assert images > 50 and before_open > 5


@loops
@pytest.mark.parametrize("ending", ["closed", "killed"])
def test_a_log_written_in_none_mode_is_durable_once_reopened(loop: str, ending: str) -> None:
    """Durability.NONE seals segments without fdatasync, and neither `close()` nor a kill
    syncs them. Opening the log again in NONE mode makes what it recovered durable (as
    `synced_lsn == last_lsn` then says), so a power loss at any step after open returned
    keeps every record from before, and what `sync()` covered since."""
    opts: dict[str, Any] = {"segment_size": 4096, "durability": "none"}

    async def main() -> int:
        disk = SimulatedDisk.from_files({}, dirs=[ROOT])
        rng = random.Random(25)
        before = [payload(f"n{j}", rng.randint(100, 1500), rng) for j in range(20)]
        async with walasync.open(LOG, io=disk, **opts) as wal:
            for data in before:
                await wal.append(data)  # rotates, sealing segments that are never synced
            assert wal.synced_lsn == 0
            if ending == "killed":
                disk = disk.crash("process")  # the page cache survives a kill
        disk.on_step = None
        wal = await walasync.open(LOG, io=disk, **opts)
        session = Session(disk, opts, ("drop",), 25)
        session.wal = wal
        session.history.start(before)
        async with wal:
            assert wal.synced_lsn == wal.last_lsn == len(before)
            for j in range(6):
                assert await session.append(wal, payload(f"m{j}", rng.randint(100, 1500), rng))
                if j % 2:
                    await wal.sync()
        session.stop()
        failures = []
        for image in distinct(session.images):
            error = await failure_of(
                check_recovered(image.disk, opts, session.history, image.floor)
            )
            if error is not None:
                failures.append(f"{image}: {error}")
        assert not failures, "\n".join(failures[:SHOW])
        return len(session.images)

    assert run(loop, main()) > 10

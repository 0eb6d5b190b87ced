"""The log against a model of it: hypothesis's stateful testing on real files.

The model is what the log should hold: a dict of LSN -> bytes, `first` (`first_lsn`) and
`next` (`last_lsn + 1`), plus the LSNs that end an append unit. Rules append (one record,
`append_many` of 0-5 records, several units at once with `asyncio.gather`), truncate the
front (at any valid LSN: below `first_lsn`, `first_lsn`, `last_lsn + 1`; invalid LSNs
expect `ValueError`), apply retention, sync, close and reopen (with the same options, and
first once with a wrong `first_lsn`, which must be refused), read random ranges (below
`first_lsn` is `TruncatedError`, below 1 `ValueError`), truncate while a read and appends
are running, and read through a read-only opening kept across steps (it must follow the
writer's truncations, cuts and recycled segments). After every step `first_lsn` and
`last_lsn` match the model, reading the whole log gives the model's records byte for byte,
and every file the retention hook was shown still existed; after a truncation or a reopen,
the oldest segment file holds `first_lsn` and none is wholly below it.

Each machine opens a log in a fresh temporary directory with 4 KiB segments (rotation
every few records), a random origin (`first_lsn=`, up to 2**63), durability (FSYNC,
INTERVAL or NONE) and retention (none, `retention_bytes` of 1 byte or three segments, or
`retention_age` of an hour), and drives it on its own event loop (asyncio or uvloop, by
parametrization): a RuleBasedStateMachine is synchronous, so each step runs its coroutine
with `run_until_complete`. What a step does to the model must not depend on timing, or
hypothesis cannot replay it: INTERVAL's background sync is an hour apart (NONE has none),
so what is durable (which bounds what retention drops) moves only with the `sync` rule
and reopening; and no file is an hour old unless the `apply_retention` rule backdates it
(`os.utime`), so what `retention_age` drops is the backdated oldest segments (all of them
in FSYNC mode; in the relaxed modes, those durable).

Retention: the pass that runs by itself after a rotation would move `first_lsn` at a
moment the model cannot know, so the `on_segment_drop` hook vetoes every drop outside the
`apply_retention` rule. Inside it, the hook records each segment it lets go, and the
model moves `first_lsn` past the last one (checking that they are consecutive, start at
the oldest segment, and are durable). A pass that began after a rotation may take the
drops instead of the rule's own call; a second, vetoed call waits until it is over.

`truncate_back(lsn)`: the rule draws an LSN from `first_lsn - 1` to `last_lsn`, expects
`ValueError` where that is not the end of an append unit (`self.unit_ends`, kept by every
append rule), and otherwise removes everything after it from the model (`cut_back`); the
invariants, reopen and reads then check the rest. The concurrent rule could add a
`truncate_back` racing the appends in the same way.

Followers: the `follow` rule starts `read(start, end, follow=True)` as a task (up to three
per opening of the log; `start` anywhere from `first_lsn - 2` to `last_lsn + 3`, `end`
none or near), some of them slow consumers that stop after a few records, holding their
batch and position, until the `release_followers` rule. The model also keeps
`synced_lsn` (the durable watermark; FSYNC: `last_lsn`; INTERVAL and NONE: it moves only
with `sync`, reopening, a `truncate_front` past it, and a `truncate_back` that removes
something). After every step (and before a `truncate_back`, so that the model knows where
each follower stands when the cut comes) every follower that is not held is first let
catch up (it waits for the watermark, or has ended), then:

- what it gave: consecutive LSNs from its start, each the model's record at that LSN when
  given (a record that `truncate_front` removed during the step counts), never one above
  `synced_lsn` when given;
- a follower that waits has given everything up to `synced_lsn` (or its `end`);
- a `truncate_back` below its position (it gave a record that is gone) dooms it: it gives
  nothing more and stops with `TruncatedError` (at the latest when the log closes); a cut
  at or after its position is no loss, and it goes on with the records after the cut;
- `TruncatedError` otherwise only when `truncate_front` overtook it (its position below
  `first_lsn`): never a skipped record;
- closing ends every follower (slow ones are let go after `close()`) with everything
  durable by then (`close()` syncs in INTERVAL mode, not in NONE mode: README, "Durability
  modes"), or ended at its `end`.

Environment: WALASYNC_MODEL_EXAMPLES (default 40) examples per event loop,
WALASYNC_MODEL_STEPS (default 30) steps per example; `--hypothesis-seed` replays.

Library bugs found on the way are at the end of this file, each a plain test now.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import LOOPS, loops, run, segment_files, small, until
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import walasync
from walasync import Record, SegmentInfo, TruncatedError
from walasync.testing import SimulatedDisk

T = TypeVar("T")

SEGMENT = 4096
EXAMPLES = int(os.environ.get("WALASYNC_MODEL_EXAMPLES", "40"))
STEPS = int(os.environ.get("WALASYNC_MODEL_STEPS", "30"))
DURABILITIES = ("fsync", "interval", "none")
AGE = 3600.0  # retention_age: only files the apply_retention rule backdates are that old

# A bug fixed since (tests/test_cut_races.py, test_a_read_that_gave_a_whole_segment_then_
# crosses_a_cut): a follower that gave the last record of a segment a truncate_back then
# emptied or deleted raised CorruptionError or WalError (ENOENT). True tolerates it after
# a cut (to look past it for other bugs, should it come back).
CUT_READ_BUG = False

MODEL = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


RECORD = st.builds(
    blob,
    st.just(0)
    | st.integers(0, 40)
    | st.integers(0, 700)
    | st.integers(SEGMENT - 100, SEGMENT + 100),  # about a segment, or more
    st.integers(0, 2**32),
)
Unit = bytes | list[bytes]  # one `append`, or one `append_many`
UNIT = RECORD | st.lists(RECORD, max_size=5)


async def append_unit(wal: walasync.Wal, unit: Unit) -> tuple[range, list[bytes]]:
    if isinstance(unit, bytes):
        lsn = await wal.append(unit)
        return range(lsn, lsn + 1), [unit]
    return await wal.append_many(unit), unit


async def append_together(
    wal: walasync.Wal, units: Sequence[Unit]
) -> list[tuple[range, list[bytes]]]:
    return list(await asyncio.gather(*(append_unit(wal, u) for u in units)))


async def read_all(
    wal: walasync.Wal | walasync.ReadOnlyWal, start: int | None = None, end: int | None = None
) -> list[Record]:
    return [r async for r in wal.read(start, end)]


@dataclass
class Follower:
    """A `read(start, end, follow=True)` running as a task, and what the model expects of
    it (see `LogModel.check_followers`)."""

    start: int
    end: int | None
    # A slow consumer: after `hold_after` records it takes no more until the
    # `release_followers` rule (or closing) sets `hold`, holding the batch it is in (and
    # its position) while the log changes.
    hold: asyncio.Event | None = None
    hold_after: int = 1
    got: list[Record] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    checked: int = 0  # records of `got` checked against the model so far
    # A truncate_back cut below its position: it gave records that are gone, so it must
    # stop with TruncatedError (once it wakes) and give nothing more; len(got) then.
    doomed: int | None = None
    error: TruncatedError | None = None
    first_at_error: int = 0  # first_lsn when it raised TruncatedError
    tolerated: bool = False  # it ran into CUT_READ_BUG
    problems: list[str] = field(default_factory=list)

    @property
    def next(self) -> int:
        """The LSN it gives next."""
        return self.start + len(self.got)

    @property
    def held(self) -> bool:
        return self.hold is not None and not self.hold.is_set() and len(self.got) >= self.hold_after

    async def consume(self, wal: walasync.Wal, reading: AsyncIterator[Record]) -> None:
        cuts = wal._store.cuts
        before = len(cuts)
        try:
            async for rec in reading:
                if rec.lsn > wal.synced_lsn:
                    self.problems.append(f"gave {rec.lsn}, synced_lsn {wal.synced_lsn}")
                if self.doomed is not None:
                    self.problems.append(f"gave {rec.lsn} after a cut below its position")
                self.got.append(rec)
                if self.hold is not None and len(self.got) >= self.hold_after:
                    await self.hold.wait()
        except TruncatedError as exc:
            self.error, self.first_at_error = exc, wal.first_lsn
        except walasync.WalError as exc:  # CorruptionError, or ENOENT (a deleted segment)
            if not (CUT_READ_BUG and len(cuts) > before):
                raise
            if not isinstance(exc, walasync.CorruptionError) and "No such file" not in str(exc):
                raise
            self.tolerated = True


class LogModel(RuleBasedStateMachine):
    """A log and what it should hold; see the module docstring."""

    def __init__(self, loop: str) -> None:
        super().__init__()
        self.loop = LOOPS[loop]()
        self.tmp = tempfile.mkdtemp(prefix="walasync-model-")
        self.path = os.path.join(self.tmp, "log")
        self.wal: walasync.Wal | None = None
        self.ro: walasync.ReadOnlyWal | None = None  # opened read-only, kept across steps
        self.options: dict[str, Any] = {}
        # The model.
        self.records: dict[int, bytes] = {}
        self.first = self.next = 1
        self.unit_ends: set[int] = set()  # LSNs that end an append unit
        # LSN -> which step appended it: a batch never holds records of two steps.
        # Retention: whether the hook lets segments go, what it let go, what went wrong.
        self.may_drop = False
        self.let_go: list[SegmentInfo] = []
        self.aged: set[int] = set()  # first LSNs of segment files backdated (retention_age)
        self.problems: list[str] = []
        # Followers of the open log; the records truncate_front removed since they were
        # last checked (one of them may have given some before the removal).
        self.followers: list[Follower] = []
        self.removed: dict[int, bytes] = {}
        # synced_lsn in the relaxed modes (FSYNC: last_lsn): it moves only with the rules
        # that sync (sync, reopen, truncate_front past it, a truncate_back that cuts).
        self.synced = 0

    def run(self, step: Awaitable[T]) -> T:
        return self.loop.run_until_complete(step)

    @property
    def log(self) -> walasync.Wal:
        assert self.wal is not None
        return self.wal

    @property
    def last(self) -> int:
        return self.next - 1

    @property
    def durable(self) -> int:
        """What synced_lsn must be."""
        return self.last if self.options["durability"] == "fsync" else self.synced

    # -- the model's own operations ---------------------------------------------------------

    def appended(self, units: list[tuple[range, list[bytes]]]) -> None:
        """Units were appended (concurrently, if several): each got consecutive LSNs, and
        together they took the next LSNs, in some order."""
        taken: list[int] = []
        for lsns, datas in units:
            assert len(lsns) == len(datas) and lsns.step == 1
            if not datas:
                continue  # an empty append_many takes no LSN
            taken.extend(lsns)
            self.records.update(zip(lsns, datas, strict=True))
            self.unit_ends.add(lsns[-1])
        assert sorted(taken) == list(range(self.next, self.next + len(taken)))
        self.next += len(taken)

    def cut_front(self, lsn: int) -> None:
        """truncate_front(lsn) in the model."""
        for n in range(self.first, min(lsn, self.next)):
            self.removed[n] = self.records.pop(n)
        self.first = max(self.first, lsn)

    def cut_back(self, lsn: int, live: Sequence[Follower] = ()) -> None:
        """truncate_back(lsn) in the model: nothing after `lsn`, the next append gets lsn + 1.
        A follower that was `live` (had not ended) and is positioned after a removed record
        gave it: it is doomed."""
        if lsn < self.last:
            for f in live:
                if f.doomed is None and lsn + 1 < f.next:
                    f.doomed = len(f.got)
        for n in range(lsn + 1, self.next):
            del self.records[n]
        self.unit_ends = {n for n in self.unit_ends if n <= lsn}
        self.next = lsn + 1

    @staticmethod
    def ended(f: Follower) -> bool:
        assert f.task is not None
        return f.task.done()

    def settle(self) -> None:
        """Wait until every follower waits for the watermark to move, or has ended: it has
        given all it will give until the log changes."""
        batcher = self.log._batcher

        def settled() -> bool:
            busy = sum(not self.ended(f) and not f.held for f in self.followers)
            return len(batcher._watchers) >= busy

        self.run(until(settled, "the followers to catch up", timeout=10))

    def check_followers(self, closed: bool = False) -> None:
        """What each follower gave: consecutive LSNs from its start, each record the one
        the model held at that LSN when given, none above `synced_lsn` when given; when it
        waits, everything up to `synced_lsn` (or its `end`); nothing more once doomed. It
        ended only at its `end`, or (`closed`) once the log closed, with everything durable
        by then; a TruncatedError only once doomed or overtaken by truncate_front."""
        if not self.followers:
            return
        if not closed:
            self.settle()
        # close() fdatasyncs in INTERVAL mode, and not in NONE mode, which syncs only on
        # sync() (README, "Durability modes"): a follower ends with what was durable then.
        interval = self.options["durability"] == "interval"
        durable = self.last if closed and interval else self.durable
        for i, f in enumerate(self.followers):
            where = f"follower {i} (from {f.start}, end {f.end})"
            assert not f.problems, f"{where}: {f.problems}"
            for n, rec in enumerate(f.got[f.checked :], f.checked):
                assert rec.lsn == f.start + n, f"{where} gave {rec.lsn} at {n}"
                data = self.records.get(rec.lsn, self.removed.get(rec.lsn))
                assert rec.data == data, f"{where}: LSN {rec.lsn} is not the model's"
            f.checked = len(f.got)
            due = max(f.start, min(durable, self.last if f.end is None else f.end) + 1)
            if f.tolerated:
                event("follow: CUT_READ_BUG")
            elif f.doomed is not None:
                assert len(f.got) == f.doomed, f"{where} went on after a cut below it"
                assert not closed or f.error is not None, f"{where} ended without error"
            elif f.error is not None:
                assert f.next < f.first_at_error, (
                    f"{where}: TruncatedError at {f.next}, first_lsn {f.first_at_error}"
                )
            elif self.ended(f) or closed:
                assert self.ended(f), f"{where} still runs after close()"
                assert f.task is not None and f.task.exception() is None
                if f.end is None or f.next <= f.end:  # it did not reach its end
                    assert closed, f"{where} ended at {f.next}"
                    assert f.next == due, f"{where} ended at {f.next}, {due} was due"
                else:
                    assert f.next == max(f.start, f.end + 1), f"{where} ended at {f.next}"
            elif not f.held:
                assert f.next == due, f"{where} waits at {f.next}, {due} is durable"
        self.removed.clear()

    async def on_drop(self, segment: SegmentInfo) -> bool | None:
        """The `on_segment_drop` hook: vetoes every drop outside `apply_retention`."""
        if not await asyncio.to_thread(os.path.exists, segment.path):
            self.problems.append(f"the hook was shown {segment}, whose file is gone")
        if not self.may_drop:
            return False
        self.let_go.append(segment)
        return None

    def check_files(self) -> None:
        """The oldest segment file holds first_lsn, and none is wholly below it."""
        firsts = [int(p.stem) for p in segment_files(Path(self.path))]
        assert firsts, "no segment file left"
        assert firsts[0] <= self.first, f"segments {firsts[:3]}, first_lsn {self.first}"
        assert len(firsts) == 1 or firsts[1] > self.first, (
            f"segment {firsts[0]} is wholly below first_lsn {self.first} but still there"
        )

    # -- rules ------------------------------------------------------------------------------

    @initialize(
        origin=st.none() | st.integers(1, 2**40) | st.just(2**63),
        durability=st.sampled_from(DURABILITIES),
        retention=st.none()
        | st.sampled_from([("retention_bytes", 1), ("retention_bytes", 3 * SEGMENT)])
        | st.just(("retention_age", AGE)),
    )
    def open_log(
        self, origin: int | None, durability: str, retention: tuple[str, float] | None
    ) -> None:
        self.options = {
            "segment_size": SEGMENT,
            "durability": durability,
            "sync_interval": 3600,  # INTERVAL syncs only when a step says so
            "retention_bytes": None,
            "retention_age": None,
            "on_segment_drop": self.on_drop,
            "first_lsn": origin,
        }
        if retention is not None:
            self.options[retention[0]] = retention[1]
        self.wal = self.run(walasync.open(self.path, **self.options))
        self.first = self.next = origin or 1
        self.synced = self.last

    @rule(data=RECORD)
    def append(self, data: bytes) -> None:
        self.appended([self.run(append_unit(self.log, data))])

    @rule(datas=st.lists(RECORD, max_size=5))
    def append_many(self, datas: list[bytes]) -> None:
        lsns, _ = result = self.run(append_unit(self.log, datas))
        if not datas:
            assert lsns == range(self.next, self.next)
        self.appended([result])

    @rule(units=st.lists(UNIT, min_size=2, max_size=6))
    def append_concurrently(self, units: list[Unit]) -> None:
        self.appended(self.run(append_together(self.log, units)))

    @rule(data=st.data())
    def truncate_front(self, data: st.DataObject) -> None:
        lsn = data.draw(
            st.sampled_from([self.first, self.next])
            | st.integers(max(1, self.first - 3), self.next)
            | st.integers(1, self.next),
            label="lsn",
        )
        self.run(self.log.truncate_front(lsn))
        if self.synced < lsn - 1:  # what stays is made durable first
            self.synced = self.last
        what = "everything" if lsn == self.next else "nothing" if lsn <= self.first else "some"
        event(f"truncate_front: {what}")
        moved = lsn >= self.first
        self.cut_front(lsn)
        if moved:
            self.check_files()

    @rule(data=st.data())
    def truncate_front_out_of_range(self, data: st.DataObject) -> None:
        lsn = data.draw(
            st.sampled_from([0, -1, self.next + 1]) | st.integers(self.next + 1, self.next + 2**64),
            label="lsn",
        )
        with pytest.raises(ValueError):
            self.run(self.log.truncate_front(lsn))

    @rule(data=st.data())
    def truncate_back(self, data: st.DataObject) -> None:
        lsn = data.draw(st.integers(self.first - 1, self.last), label="lsn")
        cut = self.log.truncate_back
        self.check_followers()  # where each follower is when the cut comes
        live = [f for f in self.followers if not self.ended(f)]
        # Cutting everything (first_lsn - 1) never splits a unit that anyone can read.
        if lsn in self.unit_ends or lsn == self.last or lsn == self.first - 1:
            self.run(cut(lsn))
            self.aged.clear()  # the cut rewrote a segment (a new mtime), maybe a backdated one
            if lsn < self.last:  # a cut makes what it keeps durable first
                self.synced = lsn
            self.cut_back(lsn, live)
        else:
            with pytest.raises(ValueError):
                self.run(cut(lsn))

    @rule(aged=st.integers(1, 3))
    def apply_retention(self, aged: int) -> None:
        """With `retention_age`, first backdate the `aged` oldest sealed segment files by
        decades: those (and no other) are old enough to go, if durable."""
        if self.options["retention_age"] is not None:
            for path in segment_files(Path(self.path))[:-1][:aged]:
                os.utime(path, (1, 1))
                self.aged.add(int(path.stem))
        self.may_drop = True
        try:
            returned = self.run(self.log.apply_retention())
        finally:
            self.may_drop = False
        self.run(self.log.apply_retention())  # after any pass that let segments go
        let_go, self.let_go = self.let_go, []
        limit = self.options["retention_bytes"]
        if limit is None and self.options["retention_age"] is None:
            assert returned == [] and let_go == []
            return
        assert let_go[len(let_go) - len(returned) :] == returned
        event(f"apply_retention: {min(len(let_go), 3)} segments dropped (3: or more)")
        if let_go:
            assert let_go[0].first_lsn <= self.first, "a drop did not start at the oldest"
            for a, b in pairwise(let_go):
                assert b.first_lsn == a.last_lsn + 1
            assert let_go[-1].last_lsn <= self.log.synced_lsn, "dropped what was not durable"
            self.cut_front(let_go[-1].last_lsn + 1)
            self.check_files()
        if limit is None:  # by age: only backdated files went, and every durable one did
            gone = {s.first_lsn for s in let_go}
            assert gone <= self.aged, f"dropped {sorted(gone - self.aged)}, not old"
            firsts = [int(p.stem) for p in segment_files(Path(self.path))]
            self.aged &= set(firsts)
            if len(firsts) > 1 and firsts[0] in self.aged:
                assert firsts[1] - 1 > self.log.synced_lsn, f"kept {firsts[0]}, old and durable"
            event(f"apply_retention by age: {min(len(gone), 3)} dropped (3: or more)")
        elif self.options["durability"] == "fsync":  # everything acknowledged is durable
            sizes = [p.stat().st_size for p in segment_files(Path(self.path))]
            assert sum(sizes) <= limit or len(sizes) == 1, f"kept {sizes} over {limit}"

    @rule()
    def sync(self) -> None:
        self.run(self.log.sync())
        self.synced = self.last

    @rule(wrong_origin=st.booleans(), keep_origin=st.booleans())
    def reopen(self, wrong_origin: bool, keep_origin: bool) -> None:
        self.close()
        origin = self.options["first_lsn"]
        if wrong_origin:
            wrong_lsn = (origin or 1) + 1 if (origin or 1) < 2**63 else origin - 1
            wrong = {**self.options, "first_lsn": wrong_lsn}
            with pytest.raises(ValueError, match="starts at LSN"):
                self.run(walasync.open(self.path, **wrong))
        # first_lsn=None is fine on an existing log, whatever it started at.
        reopen = self.options if keep_origin else {**self.options, "first_lsn": None}
        self.wal = self.run(walasync.open(self.path, **reopen))
        self.synced = self.last
        self.check_files()

    @precondition(lambda self: len(self.followers) < 3)  # of this opening of the log
    @rule(data=st.data())
    def follow(self, data: st.DataObject) -> None:
        """Start a follower (`read(start, end, follow=True)`) that runs through the steps
        that follow; `check_followers` checks it after every step."""
        start = data.draw(
            st.sampled_from([self.first, self.next]) | st.integers(self.first - 2, self.next + 2),
            label="start",
        )
        end = data.draw(st.none() | st.integers(start - 1, self.next + 6), label="end")
        slow = data.draw(st.none() | st.integers(1, 4), label="hold after")
        f = Follower(max(start, 1), end, None if slow is None else asyncio.Event(), slow or 1)

        async def begin() -> None:
            f.task = asyncio.ensure_future(
                f.consume(self.log, self.log.read(start, end, follow=True))
            )

        if start < 1:
            with pytest.raises(ValueError):
                self.run(begin())
        elif start < self.first:
            with pytest.raises(TruncatedError):
                self.run(begin())
        else:
            self.check_followers()  # before the new one runs
            self.run(begin())
            self.followers.append(f)
            where = (
                "first_lsn" if start == self.first else "next" if start == self.next else "other"
            )
            event(f"follow: from {where}, {'no end' if end is None else 'an end'}")

    @rule()
    def release_followers(self) -> None:
        """Let the slow followers go on (they take records freely from now on)."""
        for f in self.followers:
            if f.hold is not None:
                f.hold.set()

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        start = data.draw(
            st.none()
            | st.sampled_from([0, 1, self.first, self.last])
            | st.integers(max(0, self.first - 3), self.next + 2),
            label="start",
        )
        low = self.first if start is None else start
        end = data.draw(st.none() | st.integers(low - 2, self.next + 2), label="end")
        if start is not None and start < 1:
            with pytest.raises(ValueError):
                self.run(read_all(self.log, start, end))
        elif start is not None and start < self.first:
            with pytest.raises(TruncatedError):
                self.run(read_all(self.log, start, end))
        else:
            high = self.last if end is None else min(end, self.last)
            expected = [Record(n, self.records[n]) for n in range(low, high + 1)]
            assert self.run(read_all(self.log, start, end)) == expected

    @rule(data=st.data())
    def read_only(self, data: st.DataObject) -> None:
        """A reader that opened the log read-only (as another process would) at the first
        of these steps and kept it open since, with the indexes and the last segment as it
        last saw them, whatever the writer did between: it reads the model's records."""
        if self.ro is None:
            self.ro = self.run(walasync.open(self.path, readonly=True))
        start = data.draw(st.integers(self.first, self.next), label="read-only start")
        end = data.draw(st.none() | st.integers(start - 1, self.next + 2), label="end")
        high = self.last if end is None else min(end, self.last)
        expected = [Record(n, self.records[n]) for n in range(start, high + 1)]
        assert self.run(read_all(self.ro, start, end)) == expected

    @rule(data=st.data(), units=st.lists(UNIT, max_size=4), pause=st.booleans())
    def truncate_while_reading_and_appending(
        self, data: st.DataObject, units: list[Unit], pause: bool
    ) -> None:
        """A read (from `start` to last_lsn as of its call), `truncate_front(lsn)` and
        appends, all at once; with `pause`, the read waits after its first record until
        the truncation returned. The read gives the model's records from `start` on; if
        it stops with TruncatedError, the record it was at is below `lsn`; and once the
        truncation returned it gives no record below `lsn`, not even the rest of a batch it
        had read already."""
        start = data.draw(st.integers(self.first, self.next), label="start")
        lsn = data.draw(st.integers(self.first, self.next), label="lsn")
        expected = [Record(n, self.records[n]) for n in range(start, self.next)]
        truncated = asyncio.Event()

        async def consume(reading: AsyncIterator[Record]) -> tuple[list[Record], bool]:
            got: list[Record] = []
            try:
                async for rec in reading:
                    got.append(rec)
                    if truncated.is_set() and rec.lsn < lsn:
                        raise AssertionError(f"{rec.lsn} read after truncate_front({lsn})")
                    if pause and len(got) == 1:
                        await truncated.wait()
            except TruncatedError:
                return got, True
            return got, False

        async def truncate() -> None:
            await self.log.truncate_front(lsn)
            truncated.set()

        async def together() -> tuple[tuple[list[Record], bool], list[tuple[range, list[bytes]]]]:
            reading = self.log.read(start)
            read, _, appended = await asyncio.gather(
                consume(reading), truncate(), append_together(self.log, units)
            )
            return read, appended

        (got, stopped), appended = self.run(together())
        event(f"read racing truncate_front: {'TruncatedError' if stopped else 'read all'}")
        assert got == expected[: len(got)]
        if stopped:
            assert start + len(got) < lsn, f"TruncatedError at {start + len(got)}, cut at {lsn}"
        else:
            assert got == expected
        self.appended(appended)
        self.cut_front(lsn)
        # The truncation synced (or not) while some of the appends were acknowledged.
        assert self.synced <= self.log.synced_lsn <= self.last
        self.synced = self.log.synced_lsn

    def close(self) -> None:
        """Close the log: every follower ends (see `check_followers`)."""
        self.check_followers()
        self.run(self.log.close())
        assert self.log.closed
        self.release_followers()  # a follower may be inside a pass when the log closes
        tasks = [f.task for f in self.followers if f.task is not None]
        self.run(until(lambda: all(t.done() for t in tasks), "followers to end", timeout=10))
        self.check_followers(closed=True)
        self.followers.clear()

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def followers_match_model(self) -> None:
        if self.wal is not None:
            self.check_followers()

    @invariant()
    def log_matches_model(self) -> None:
        if self.wal is None:
            return
        assert (self.wal.first_lsn, self.wal.last_lsn) == (self.first, self.last)
        assert self.wal.synced_lsn == self.durable, "synced_lsn is not the model's"
        assert len(self.records) == self.next - self.first
        got = self.run(read_all(self.wal))
        assert [r.lsn for r in got] == list(range(self.first, self.next))
        for rec in got:
            assert rec.data == self.records[rec.lsn], f"LSN {rec.lsn} differs"
        assert not self.problems
        event(f"segment files: {min(len(segment_files(Path(self.path))), 4)}")

    def teardown(self) -> None:
        try:
            if self.ro is not None:
                self.run(self.ro.close())
            if self.wal is not None:
                try:
                    self.close()
                finally:
                    self.run(self.wal.close())  # if a check in close() failed
                    for f in self.followers:
                        if f.task is not None:
                            f.task.cancel()
                            self.run(asyncio.wait([f.task]))
        finally:
            try:
                self.run(self.loop.shutdown_asyncgens())
                self.run(self.loop.shutdown_default_executor())
            finally:
                self.loop.close()
                shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.mark.timeout(max(120, 3 * EXAMPLES * STEPS // 10))
@loops
def test_log_matches_model(loop: str) -> None:
    run_state_machine_as_test(lambda: LogModel(loop), settings=MODEL)  # type: ignore[arg-type]


# -- library bugs found on the way (each fixed, and kept as a plain test) ----------------------


def record(i: int) -> bytes:
    return b"record %d|" % i + bytes(150)


async def fill(wal: walasync.Wal, n: int) -> None:
    for _ in range(n):
        await wal.append(record(wal.last_lsn + 1))


async def test_truncating_unsynced_sealed_segments_in_none_mode_keeps_the_log_working(
    log_dir: Path,
) -> None:
    async with walasync.open(log_dir, durability="none", **small()) as wal:
        await fill(wal, 60)  # three segments, the first two sealed but never synced
        await wal.truncate_front(wal.last_lsn + 1)
        await wal.sync()
        assert await wal.append(b"after") == 61


async def test_retention_in_none_mode_keeps_the_log_working(log_dir: Path) -> None:
    async with walasync.open(log_dir, durability="none", retention_bytes=1, **small()) as wal:
        await wal.append(b"a")
        await wal.sync()  # record 1 is durable, so retention may drop its segment
        await wal.append(bytes(4060))  # a rotation: the first segment is sealed, unsynced
        await wal.apply_retention()  # or the pass after the rotation did it already
        assert wal.first_lsn == 2
        await wal.sync()
        assert await wal.append(b"after") == 3


async def test_a_read_overtaken_inside_a_batch_yields_no_removed_record(log_dir: Path) -> None:
    async with walasync.open(log_dir) as wal:
        await wal.append_many([b"a", b"b", b"c", b"d"])  # one batch
        await wal.append(b"e")
        reading = wal.read()
        assert await reading.__anext__() == Record(1, b"a")
        await wal.truncate_front(6)
        got = []
        with pytest.raises(TruncatedError):
            async for rec in reading:
                got.append(rec)  # noqa: PERF401 - here: 2, 3 and 4, removed already
        assert got == []


async def test_a_read_overtaken_inside_a_batch_by_truncate_back_yields_no_removed_record(
    log_dir: Path,
) -> None:
    async with walasync.open(log_dir) as wal:
        # Two units, queued before the batcher runs: one batch.
        await asyncio.gather(wal.append_many([b"a", b"b"]), wal.append_many([b"c", b"d"]))
        reading = wal.read()
        assert await reading.__anext__() == Record(1, b"a")
        await wal.truncate_back(2)
        await wal.append_many([b"C", b"D"])  # LSNs 3 and 4 again, other data
        got = [await reading.__anext__()]
        with pytest.raises(TruncatedError):
            got.extend([rec async for rec in reading])
        assert got == [Record(2, b"b")]


async def test_a_follower_overtaken_inside_a_batch_yields_no_removed_record(
    log_dir: Path,
) -> None:
    async with walasync.open(log_dir) as wal:
        await asyncio.gather(wal.append_many([b"a", b"b"]), wal.append_many([b"c", b"d"]))
        following = wal.read(follow=True, end=6)
        assert await following.__anext__() == Record(1, b"a")
        await wal.truncate_back(2)
        await wal.append_many([b"C", b"D", b"E", b"F"])
        # The follower had given nothing past the cut: it goes on with the new records.
        assert [rec async for rec in following] == [
            Record(2, b"b"),
            Record(3, b"C"),
            Record(4, b"D"),
            Record(5, b"E"),
            Record(6, b"F"),
        ]
        following = wal.read(follow=True)
        assert await following.__anext__() == Record(1, b"a")
        await wal.truncate_front(4)
        with pytest.raises(TruncatedError):
            await following.__anext__()  # record 2, removed: not given
        await following.aclose()


async def test_a_read_racing_a_truncation_never_skips_records(
    log_dir: Path, no_blocking_calls_on_the_loop: Any
) -> None:
    async with walasync.open(log_dir, **small()) as wal:
        await fill(wal, 100)
        store = wal._store
        cut = store.snapshot()[2]  # a segment boundary, as retention's drops are
        take_snapshot = store.snapshot

        def snapshot_after_a_truncation() -> tuple[int, ...]:
            # The I/O thread commits truncate_front(cut) just after read() checked start.
            no_blocking_calls_on_the_loop.deactivate()  # the join below, on the loop
            truncating = threading.Thread(target=store.truncate_front, args=(cut,))
            truncating.start()
            truncating.join()
            no_blocking_calls_on_the_loop.activate()
            return tuple(take_snapshot())

        store.snapshot = snapshot_after_a_truncation
        with pytest.raises(TruncatedError):
            try:
                reading = wal.read(5)
            finally:
                store.snapshot = take_snapshot
            # Checking first_lsn before the snapshot would start the read at `cut`.
            first = await reading.__anext__()
            pytest.fail(f"read(5) began with LSN {first.lsn}, records 5..{cut - 1} gone")
        assert wal.first_lsn == cut


@loops
def test_truncate_front_then_power_loss_in_relaxed_modes(loop: str) -> None:
    async def main(durability: str) -> None:
        disk = SimulatedDisk.from_files({}, dirs=["/data"])
        opts = small(sync_interval=3600)
        async with walasync.open("/data/log", io=disk, durability=durability, **opts) as wal:
            await fill(wal, 5)
            await wal.sync()
            await fill(wal, 5)  # acknowledged, not yet synced
            await wal.truncate_front(11)
            after = disk.crash()  # power loss: records 6..10 go, META stays
        async with walasync.open("/data/log", io=after, **small()) as wal:
            assert wal.first_lsn <= wal.last_lsn + 1, (wal.first_lsn, wal.last_lsn)
            lsn = await wal.append(b"durable")
            assert [r async for r in wal.read(lsn)] == [Record(lsn, b"durable")]

    for durability in ("interval", "none"):
        run(loop, main(durability))


async def test_open_refuses_a_first_lsn_beyond_the_lsn_field(log_dir: Path) -> None:
    with pytest.raises(ValueError):
        await walasync.open(log_dir, first_lsn=2**64)

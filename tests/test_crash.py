"""Crash torture: whatever `append` acknowledged survives a SIGKILL of the writing process,
and whatever `truncate_front` removed stays removed.

Each round starts `tests/_writer.py` on the same log (64 appender coroutines, 64 KiB
segments, so batches are concurrent and rotations frequent), lets it run to a random
moment (after some acknowledgements, a random delay that may fall in interpreter start-up
or recovery, or just after the open), SIGKILLs it, reopens the log here and checks:

- LSNs are dense from `first_lsn` to `last_lsn`, and nothing before the round changed
  (per-record digests of everything verified in earlier rounds, acknowledged or not);
- every acknowledged LSN of the round holds exactly the record the writer acknowledged;
- every other record of the round belongs to a unit the writer had started to append and
  not seen acknowledged, whole (`append_many` is all or nothing), at consecutive LSNs, and
  each such unit appears at most once: no record that was never appended shows up.

The writer announces each unit on stdout before appending it and acknowledges it after,
so the pipe, which survives the kill, tells exactly what was attempted and acknowledged.

A SIGKILL leaves the page cache alone, so this tests what the process crash can break:
torn batches, half-done rotations, recovery of the tail, and acknowledging too early.

Meanwhile reader coroutines in the writer read the log as it grows and check every
record they get; a failure there kills the writer with a traceback, which fails the test.

With truncation (`test_truncated_log_survives_sigkill`), the writer also calls
`truncate_front` every few milliseconds and announces each call before (`T? LSN`) and
after it returns (`T LSN`); with retention, its `on_segment_drop` hook announces each
segment it lets go (`R FIRST LAST`: the drop makes `first_lsn` LAST + 1, and the hook
being called at all proves that `first_lsn` is at least FIRST, the oldest segment's start,
durably). After each kill the checks above hold from `first_lsn` on, and:

- `first_lsn` did not go back, is at least the highest completed truncation (and every
  announced drop's FIRST), and is one of the LSNs a truncation or drop of the round began
  (or where the round started): a removal is all or nothing, never a point in between;
- `first_lsn <= last_lsn + 1`, and `read` below `first_lsn` raises `TruncatedError`;
- the oldest segment file holds `first_lsn` and the next starts above it (recovery deleted
  the files of a truncation the writer did not finish);
- records of the round below `first_lsn` need not be there; above it, a record the round
  did not acknowledge may be the tail of a unit whose head was truncated.

With `truncate_back` (`test_cut_log_survives_sigkill`), the writer also calls
`truncate_back(LSN)` at acknowledged unit ends every few milliseconds, announced before
(`B? LSN`) and after it returns (`B LSN`). The pipe orders every acknowledgement before or
after each cut as it happened (appends queued before the call are acknowledged before it
returns, later ones after), and a writer's (writer, seq) never repeats, so replaying the
pipe gives which record each LSN holds at the kill: an LSN a cut freed and an append took
again holds the new record. After each kill:

- every acknowledged record that no completed cut removed since is there, byte for byte
  (one that a cut removed and nothing re-took is at most an unacknowledged unit's record:
  a removed record that came back fails the tiling above);
- `last_lsn` is at least the LSN of the last completed cut (and every acknowledgement
  after it), and records of earlier rounds at or below the lowest cut are unchanged;
- a cut running at the kill (`B?` without `B`) happened whole or not at all: the log ends
  at its LSN (nothing after it: only the cut explains that) or holds everything
  acknowledged, pre-cut appends included, and is checked as that state;
- LSNs dense, as always.

Some rounds kill at a random moment after a cut began, others make the writer SIGKILL
itself right before the n-th file-changing call of a cut (`--die-in-cut`): a timed kill
lands in the few microseconds between deleting a segment and zeroing the cut's tail only
by luck.

Environment: WALASYNC_TORTURE_ROUNDS (default 4) rounds per test case,
WALASYNC_TORTURE_SEED to replay a failure (the seed is in every failure message),
WALASYNC_TORTURE_READERS (default 2) reader coroutines in the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import _writer as writer
import pytest

import walasync

HERE = Path(__file__).resolve().parent
WRITER = HERE / "_writer.py"
ROOT = Path(walasync.__file__).resolve().parent.parent

ROUNDS = int(os.environ.get("WALASYNC_TORTURE_ROUNDS", "4"))
SEED = int(os.environ.get("WALASYNC_TORTURE_SEED") or random.SystemRandom().randrange(1 << 32))
READERS = os.environ.get("WALASYNC_TORTURE_READERS", "2")  # in the writer, reading as it goes
WAIT = 60.0  # seconds to wait for a writer's output before giving up on it
CUT_ACKS = 200  # a ("cut", s) kill plan waits for a truncate_back after this many acks
CUT_STEPS = 24  # a ("step", n) kill plan: n from 1 to this


def subprocess_env() -> dict[str, str]:
    """The environment for a child Python that must import this checkout's walasync."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def describe(data: bytes) -> str:
    """A record for a failure message: its length and what its header claims."""
    head, sep, _ = data.partition(b"|")
    return f"{len(data)} bytes, header {head.decode(errors='replace')!r}" + (
        "" if sep else " (cut short)"
    )


@dataclass
class Run:
    """One writer process: what it announced and acknowledged before it was killed."""

    run: int
    start: int  # last_lsn of the log before this run
    plan: tuple[str, float]
    # With an ("acks", n) plan, also wait for this many completed truncations, drops, and
    # truncate_back calls.
    removals: tuple[int, int, int] = (0, 0, 0)
    end: int = -1  # last_lsn of the log after this run
    opened: tuple[int, int] | None = None
    units: dict[tuple[int, int], int] = field(default_factory=dict)  # (writer, seq) -> k
    # Every acknowledgement: (writer, seq) -> (LSN, truncate_back calls returned before it).
    acked: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    # LSN -> (writer, seq): the acknowledged records no completed truncate_back removed
    # (nor the one in progress, if any: see `cut_pending`).
    acks: dict[int, tuple[int, int]] = field(default_factory=dict)
    begun: list[int] = field(default_factory=list)  # truncate_front(LSN) called
    done: list[int] = field(default_factory=list)  # truncate_front(LSN) returned
    drops: list[tuple[int, int]] = field(default_factory=list)  # (first, last) let go
    cuts: list[int] = field(default_factory=list)  # truncate_back(LSN) returned
    cut_pending: int | None = None  # truncate_back(LSN) called and not returned (yet)
    # The lowest LSN the log may hold at the kill: run.start, then as each truncate_back
    # returned its LSN, raised by every acknowledgement after it.
    floor: int = -1
    returncode: int | None = None
    stderr: bytes = b""

    def __post_init__(self) -> None:
        self.floor = self.start

    def parse(self, line: bytes) -> None:
        if not line.endswith(b"\n"):
            return  # cannot happen (lines are written whole), but a cut line proves nothing
        fields = line.split()
        if fields[0] == b"open":
            self.opened = (int(fields[1]), int(fields[2]))
        elif fields[0] == b"+":
            w, seq, k = map(int, fields[1:])
            self.units[w, seq] = k
        elif fields[0] == b"T?":
            self.begun.append(int(fields[1]))
        elif fields[0] == b"T":
            self.done.append(int(fields[1]))
        elif fields[0] == b"T-":
            pass  # refused: `begun` holds a first_lsn that cannot happen, which is harmless
        elif fields[0] == b"R":
            self.drops.append((int(fields[1]), int(fields[2])))
        elif fields[0] == b"B?":
            if self.cut_pending is not None:
                raise AssertionError(f"truncate_back({int(fields[1])}) began during another")
            self.cut_pending = int(fields[1])
        elif fields[0] in (b"B", b"B-"):
            lsn = int(fields[1])
            if self.cut_pending != lsn:
                raise AssertionError(f"truncate_back({lsn}) ended, {self.cut_pending} was begun")
            self.cut_pending = None
            if fields[0] == b"B":
                self.cut_back(lsn)
                self.cuts.append(lsn)
        else:
            lsn, w, seq = map(int, fields)
            if lsn in self.acks:
                raise AssertionError(f"LSN {lsn} acknowledged twice: {self.acks[lsn]}, {w, seq}")
            if (w, seq) in self.acked:
                raise AssertionError(f"writer {w} seq {seq} acknowledged twice")
            self.acks[lsn] = (w, seq)
            self.acked[w, seq] = (lsn, len(self.cuts))
            self.floor = max(self.floor, lsn)

    def cut_back(self, lsn: int) -> None:
        """A truncate_back(lsn) happened: the acknowledged records after `lsn` are gone."""
        for gone in [n for n in self.acks if n > lsn]:
            del self.acks[gone]
        self.floor = lsn


async def run_writer(log_dir: Path, run: Run, loop_name: str, durability: str, *extra: str) -> None:
    """Start the writer of `run`, SIGKILL it as its plan says, and collect its output."""
    kind, amount = run.plan
    if kind == "step":
        extra = (*extra, "--die-in-cut", str(int(amount)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        str(log_dir),
        str(run.run),
        "--loop",
        loop_name,
        "--durability",
        durability,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    opened = asyncio.Event()
    enough_acks = asyncio.Event()
    cutting = asyncio.Event()  # a truncate_back began after CUT_ACKS acknowledgements

    async def read_stdout() -> None:
        assert proc.stdout is not None
        try:
            async for line in proc.stdout:
                run.parse(line)
                if run.opened is not None:
                    opened.set()
                truncations, drops, cuts = run.removals
                if (
                    len(run.acked) >= amount
                    and len(run.done) >= truncations
                    and len(run.drops) >= drops
                    and len(run.cuts) >= cuts
                ):
                    enough_acks.set()
                if run.cut_pending is not None and len(run.acked) >= CUT_ACKS:
                    cutting.set()
        finally:  # EOF (the writer is gone) or a bad line: stop waiting
            opened.set()
            enough_acks.set()
            cutting.set()

    stdout = asyncio.ensure_future(read_stdout())
    stderr = asyncio.ensure_future(proc.stderr.read())
    try:
        if kind == "acks":
            await asyncio.wait_for(enough_acks.wait(), WAIT)
        elif kind == "cut":  # a short delay after a truncate_back began
            await asyncio.wait_for(cutting.wait(), WAIT)
            await asyncio.wait([stdout], timeout=amount)
        elif kind == "step":  # the writer kills itself in its third truncate_back
            await asyncio.wait_for(asyncio.shield(stdout), WAIT)
        elif kind == "delay":
            await asyncio.wait([stdout], timeout=amount)  # wakes early if the writer dies
        else:  # "open": a short delay after the log is open
            await asyncio.wait_for(opened.wait(), WAIT)
            await asyncio.wait([stdout], timeout=amount)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        run.returncode = await proc.wait()
        await asyncio.wait([stdout, stderr])
    run.stderr = stderr.result()
    stdout.result()


def tile(
    stretches: list[tuple[bytes, ...]], units: list[tuple[bytes, ...]], head_cut: bool = False
) -> bool:
    """Can every stretch be cut into whole units, each unit used at most once?

    With `head_cut`, the first stretch may start with the tail of a unit instead (its head
    was truncated). Records cut short inside their header (or empty) look alike, so this
    searches; units with equal contents are interchangeable and tried once per position.
    """
    used = [False] * len(units)
    nodes = 0

    def go(i: int, pos: int) -> bool:
        nonlocal nodes
        nodes += 1
        if nodes > 200_000:
            raise AssertionError("tiling search exceeded its budget")
        if i == len(stretches):
            return True
        stretch = stretches[i]
        if pos == len(stretch):
            return go(i + 1, 0)
        tried = set()
        tails = head_cut and i == 0 and pos == 0
        for j, unit in enumerate(units):
            parts = [unit[k:] for k in range(1, len(unit))] if tails else []
            for part in [*parts, unit]:
                if used[j] or part in tried or stretch[pos : pos + len(part)] != part:
                    continue
                tried.add(part)
                used[j] = True
                if go(i, pos + len(part)):
                    return True
                used[j] = False
        return False

    return go(0, 0)


class Checker:
    """The state of one log across rounds: the digest of every record verified so far,
    and where the log starts."""

    def __init__(self, log_dir: Path, context: str, seed: str = "") -> None:
        self.log_dir = log_dir
        self.context = context
        # Index i: the record with LSN i + 1 (None: truncated before any round saw it).
        self.digests: list[bytes | None] = []
        self.first = 1  # first_lsn as the last round left it
        self.acknowledged = 0
        self.truncations = 0  # truncate_front calls that returned, over all rounds
        self.drops = 0  # segments the hook let go, over all rounds
        self.cuts = 0  # truncate_back calls that returned, over all rounds
        self.cut_kills = 0  # rounds killed while a truncate_back ran
        self.rng = random.Random(f"checker/{seed}")

    def fail(self, message: str) -> None:
        pytest.fail(f"[{self.context}] {message}", pytrace=False)

    async def verify(self, run: Run) -> None:
        """Reopen the log after `run` was killed and check everything (see module doc)."""
        # 255 with nothing on stderr: asyncio's child watcher lost the status ("Unknown
        # child process pid"), which happens when the suite runs in parallel processes; a
        # writer that fails on its own exits 1 with a traceback.
        if run.returncode not in (-signal.SIGKILL, 255) or run.stderr:
            self.fail(
                f"run {run.run}: the writer exited with {run.returncode} instead of being "
                f"killed, or wrote to stderr:\n{run.stderr.decode(errors='replace')}"
            )
        known = len(self.digests)
        # Records at or below `unsure` are as earlier rounds left them, unless a
        # truncate_back of this round cut below them (then the records above its LSN are
        # this round's); records above it may be this round's.
        pending = [] if run.cut_pending is None else [run.cut_pending]
        unsure = min([known, *run.cuts, *pending])
        new: dict[int, bytes] = {}
        async with walasync.open(self.log_dir, segment_size=writer.SEGMENT_SIZE) as wal:
            first, last = wal.first_lsn, wal.last_lsn
            self.check_first(run, first, last)
            lsn = first - 1
            async for rec in wal.read():
                lsn += 1
                if rec.lsn != lsn:
                    self.fail(f"read gave LSN {rec.lsn} where LSN {lsn} was due")
                if lsn <= unsure:
                    if digest(rec.data) != self.digests[lsn - 1]:
                        self.fail(f"LSN {lsn}, verified in an earlier round, changed")
                else:
                    new[lsn] = rec.data
            if lsn != last:
                self.fail(f"read gave records {first}..{lsn}, but last_lsn is {last}")
            self.check_truncated(wal, first)
        # A truncate_back running at the kill happened whole or not at all: the log holds
        # nothing after its LSN (only the cut can explain that: everything acknowledged
        # before it is above its LSN), or everything acknowledged.
        cut = bool(pending) and last <= pending[0]
        if cut:
            run.cut_back(pending[0])
        base = min([known, *run.cuts, *(pending if cut else [])])
        for n in range(max(first, unsure + 1), min(base, last) + 1):
            if digest(new.pop(n)) != self.digests[n - 1]:
                self.fail(f"LSN {n}, verified in an earlier round, changed")
        if last < run.floor:
            self.fail(
                f"run {run.run} (killed: {run.plan}): last_lsn is {last}, below {run.floor}: "
                f"records lost (acknowledged, or kept by truncate_back; cuts "
                f"{run.cuts[-3:]}, pending {pending}, happened: {cut})"
            )
        self.check_files(first)
        run.end = last
        self.check_run(run, new, first, base)
        del self.digests[base:]
        self.digests.extend(digest(new[n]) if n in new else None for n in range(base + 1, last + 1))
        self.first = first
        self.acknowledged += len(run.acked)
        self.truncations += len(run.done)
        self.drops += len(run.drops)
        self.cuts += len(run.cuts)
        self.cut_kills += bool(pending)
        print(  # shown with -s: what each round covered
            f"run {run.run} killed {run.plan}: +{last - base} records "
            f"({len(run.acked)} acknowledged), {len(run.done)}/{len(run.begun)} truncations "
            f"done, {len(run.drops)} segments dropped, {len(run.cuts)} truncate_back done"
            f"{f' (killed in one: {cut=})' if pending else ''}, log {first}..{last}"
        )

    def check_first(self, run: Run, first: int, last: int) -> None:
        """`first_lsn` after `run`: where a truncation or drop of it began, or where the
        run started; at least what completed; and within the log's LSNs."""
        where = f"run {run.run} (killed: {run.plan})"
        began = {self.first, *run.begun, *(drop_last + 1 for _, drop_last in run.drops)}
        done = max([self.first, *run.done, *(drop_first for drop_first, _ in run.drops)])
        if first < done:
            self.fail(
                f"{where}: first_lsn is {first}, below {done}: a completed truncation (or "
                f"one proved by a later drop) was undone (started at {self.first}, "
                f"truncations done {sorted(run.done)[-3:]}, drops {run.drops[-3:]})"
            )
        if first not in began:
            self.fail(
                f"{where}: first_lsn is {first}, where no truncation or drop began (started "
                f"at {self.first}, begun {sorted(run.begun)[-5:]}, drops {run.drops[-3:]})"
            )
        if first > last + 1:
            self.fail(f"{where}: first_lsn {first} is above last_lsn + 1 = {last + 1}")

    def check_truncated(self, wal: walasync.Wal, first: int) -> None:
        """Nothing below `first` can be read."""
        if first == 1:
            return
        for lsn in {1, first - 1, self.rng.randint(1, first - 1)}:
            with pytest.raises(walasync.TruncatedError):
                wal.read(lsn)

    def check_files(self, first: int) -> None:
        """The oldest segment holds `first` and no segment wholly below it is left."""
        firsts = [int(p.stem) for p in sorted(self.log_dir.glob("*.wal"))]
        if not firsts or firsts[0] > first or (len(firsts) > 1 and firsts[1] <= first):
            self.fail(f"segment files start at {firsts[:3]}, but first_lsn is {first}")

    def check_run(self, run: Run, new: dict[int, bytes], log_first: int, base: int) -> None:
        """Check the records `run` added (`new`: LSN -> data, from `log_first`, the log's
        first_lsn, or `base` + 1, on) against what it announced."""
        where = f"run {run.run} (LSNs {run.start + 1}..{run.end}, killed: {run.plan})"
        if run.opened is not None and run.opened != (self.first, run.start):
            self.fail(
                f"{where}: the writer opened the log at {run.opened}, not "
                f"({self.first}, {run.start})"
            )
        if new and run.opened is None:
            self.fail(f"{where}: {len(new)} records appeared, but the writer never opened")
        # Acknowledged records (and not removed by truncate_back since): present (unless
        # truncated), exact; every unit acknowledged whole at consecutive LSNs, in order.
        lsn_of = {ws: lsn for ws, (lsn, _) in run.acked.items()}
        for lsn, (w, seq) in sorted(run.acks.items()):
            if lsn < log_first:
                continue
            if lsn not in new:
                self.fail(f"{where}: acknowledged LSN {lsn} (writer {w} seq {seq}) is missing")
            if new[lsn] != writer.record(run.run, w, seq):
                self.fail(
                    f"{where}: LSN {lsn} holds {describe(new[lsn])}, but writer {w} seq {seq} "
                    "was acknowledged there"
                )
        in_flight: list[tuple[int, int, int]] = []
        per_writer: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        covered: set[tuple[int, int]] = set()
        for (w, seq), k in run.units.items():
            if k != writer.unit_length(run.run, w, seq):
                self.fail(f"{where}: writer {w} seq {seq} announced {k} records")
            acked = [lsn_of.get((w, s)) for s in range(seq, seq + k)]
            first = acked[0]
            if first is None and acked.count(None) == k:
                in_flight.append((w, seq, k))
            elif first is None or acked != list(range(first, first + k)):
                self.fail(f"{where}: unit writer {w} seq {seq} acknowledged at LSNs {acked}")
            else:
                per_writer[w].append((seq, run.acked[w, seq][1], first))
                covered.update((w, s) for s in range(seq, seq + k))
        if stray := set(lsn_of) - covered:
            self.fail(f"{where}: acknowledged (writer, seq) never announced: {sorted(stray)}")
        for w, acked_units in per_writer.items():
            # Up between truncate_back calls: (calls before it, LSN) in order.
            order = [(cuts, lsn) for _, cuts, lsn in sorted(acked_units)]
            if order != sorted(order):
                self.fail(f"{where}: writer {w}'s sequential appends got LSNs out of order")
        writers = [w for w, _, _ in in_flight]
        if len(writers) != len(set(writers)):
            self.fail(f"{where}: a writer had two units in flight: {sorted(in_flight)}")
        # Every other record: whole in-flight units, each at most once; the first may have
        # lost its head to a truncation, if the log now starts inside this round.
        unacked = sorted(set(new) - set(run.acks))
        stretches: list[list[int]] = []
        for lsn in unacked:
            if stretches and stretches[-1][-1] == lsn - 1:
                stretches[-1].append(lsn)
            else:
                stretches.append([lsn])
        units = [
            tuple(writer.record(run.run, w, s) for s in range(seq, seq + k))
            for w, seq, k in in_flight
        ]
        contents = [tuple(new[lsn] for lsn in stretch) for stretch in stretches]
        head_cut = log_first > base + 1 and bool(stretches) and stretches[0][0] == log_first
        if not tile(contents, units, head_cut):
            removed = {  # acknowledged, then removed by truncate_back
                writer.record(run.run, w, s): lsn
                for (w, s), (lsn, _) in run.acked.items()
                if run.acks.get(lsn) != (w, s)
            }
            shown = "\n".join(
                f"  LSN {lsn}: {describe(new[lsn])}"
                + (
                    f" (acknowledged at LSN {removed[new[lsn]]}, then truncate_back removed it)"
                    if new[lsn] in removed
                    else ""
                )
                for stretch in stretches
                for lsn in stretch
            )
            flying = ", ".join(f"w{w} seq {seq}+{k}" for w, seq, k in sorted(in_flight))
            self.fail(
                f"{where}: unacknowledged records that are not whole, distinct units the "
                f"writer was appending:\n{shown}\nunits in flight: {flying}"
            )


def kill_plan(rng: random.Random, round_no: int, cuts: bool = False) -> tuple[str, float]:
    """When to kill the writer: ("acks", n), ("delay", s) from start, ("open", s) after,
    or, if it calls truncate_back (`cuts`), ("cut", s) after one began or ("step", n):
    it kills itself before the n-th step of a cut (--die-in-cut)."""
    if round_no == 0:
        return ("acks", 300)
    if cuts and rng.random() < 0.6:
        if rng.random() < 0.5:  # SIGKILL before the n-th step: most cuts take 17-22
            return ("step", rng.randint(1, CUT_STEPS))
        return ("cut", round(rng.uniform(0.0, 0.08), 3))  # a cut takes 10-100 ms (fsyncs)
    r = rng.random()
    if r < 0.5:
        return ("acks", rng.randint(1, 3000))
    if r < 0.8:
        return ("delay", round(rng.uniform(0.0, 0.4), 3))  # may hit start-up or recovery
    return ("open", round(rng.uniform(0.0, 0.02), 4))  # the first batches and rotations


async def torture(
    log_dir: Path,
    writer_loop: str,
    durability: str,
    *extra: str,
    removals: tuple[int, int, int] = (0, 0, 0),
) -> Checker:
    """Kill the writer (started with `extra` options) ROUNDS times on one log, checking
    the log after each kill. The first round runs until `removals` (completed
    truncations, drops, truncate_back calls) happened too."""
    test_loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
    key = "/".join((str(SEED), writer_loop, durability, *extra, test_loop))
    rng = random.Random(key)
    context = f"WALASYNC_TORTURE_SEED={SEED} writer on {writer_loop}, durability={durability}"
    checker = Checker(log_dir, " ".join((context, *extra)), seed=key)
    run_ids = rng.sample(range(1, 1_000_000), ROUNDS)
    for round_no, run_id in enumerate(run_ids):
        plan = kill_plan(rng, round_no, "--truncate-back" in extra)
        run = Run(run_id, start=len(checker.digests), plan=plan)
        if round_no == 0:
            run.removals = removals
        checker.context = f"{context} {' '.join(extra)}, round {round_no + 1}/{ROUNDS}"
        await run_writer(log_dir, run, writer_loop, durability, "--readers", READERS, *extra)
        await checker.verify(run)
    assert checker.acknowledged >= 300  # the first round alone acknowledged that many
    return checker


@pytest.mark.timeout(max(120, 20 * ROUNDS))
@pytest.mark.parametrize(
    ("writer_loop", "durability"),
    [("asyncio", "fsync"), ("uvloop", "fsync"), ("asyncio", "none"), ("uvloop", "interval")],
)
async def test_acknowledged_records_survive_sigkill(
    log_dir: Path, writer_loop: str, durability: str
) -> None:
    await torture(log_dir, writer_loop, durability)


RETAIN = str(4 * writer.SEGMENT_SIZE)  # about four segments: retention drops every few


@pytest.mark.timeout(max(120, 20 * ROUNDS))
@pytest.mark.parametrize(
    ("writer_loop", "durability", "retention"),
    [
        ("asyncio", "fsync", None),
        ("uvloop", "fsync", RETAIN),
        ("asyncio", "interval", RETAIN),
        ("uvloop", "none", RETAIN),
    ],
)
async def test_truncated_log_survives_sigkill(
    log_dir: Path, writer_loop: str, durability: str, retention: str | None
) -> None:
    """As above, with `truncate_front` every few milliseconds (and retention): see the
    module docstring. In Durability.NONE too: a kill leaves the page cache, so everything
    acknowledged (written to the OS) is there; the segments it seals unsynced are dropped
    by `truncate_front` and retention, which drops only what was synced (the truncations
    sync: what stays is made durable first)."""
    extra = ("--truncate", *(("--retention", retention) if retention else ()))
    removals = (3, 2 if retention else 0, 0)  # in the first round, before the kill
    checker = await torture(log_dir, writer_loop, durability, *extra, removals=removals)
    assert checker.truncations >= removals[0] and checker.drops >= removals[1]


@pytest.mark.timeout(max(120, 20 * ROUNDS))
@pytest.mark.parametrize(
    ("writer_loop", "durability", "extra"),
    [("asyncio", "fsync", ()), ("uvloop", "interval", ("--truncate", "--retention", RETAIN))],
)
async def test_cut_log_survives_sigkill(
    log_dir: Path, writer_loop: str, durability: str, extra: tuple[str, ...]
) -> None:
    """As above, with `truncate_back` every few milliseconds (and, in the second case,
    `truncate_front` and retention as well): see the module docstring."""
    removals = (1 if extra else 0, 0, 3)  # in the first round, before the kill
    checker = await torture(
        log_dir, writer_loop, durability, "--truncate-back", *extra, removals=removals
    )
    assert checker.cuts >= 3


async def test_read_stops_at_end_across_batches(log_dir: Path) -> None:
    """The readers in `_writer.py` found this: `read` must not run past `end` (or past
    `last_lsn`) when one chunk of the file holds several batches after it."""
    async with walasync.open(log_dir) as wal:
        await wal.append(b"a")
        await wal.append(b"b")
        await wal.append_many([b"c", b"d", b"e"])  # three batches: [1], [2], [3, 4, 5]
        assert [tuple(r) async for r in wal.read(end=1)] == [(1, b"a")]
        assert [r.lsn async for r in wal.read(start=1, end=3)] == [1, 2, 3]

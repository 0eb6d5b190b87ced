"""Crash-test writer: appends deterministic records to a log forever, until it is killed.

Usage: python tests/_writer.py DIR RUN [--loop asyncio|uvloop] [--durability MODE]
                               [--writers N] [--readers N] [--truncate] [--retention BYTES]
                               [--truncate-back [--die-in-cut STEP]]

`RUN` (an int) names this process's run: it seeds the options and is part of every record,
so records of different runs never look alike. Each of the N appender coroutines (default
64) appends units, one after another, forever: a unit is one record (`append`) or 2-5
records (`append_many`), and both its length and its records' content are functions of
(run, writer, seq) alone, so a test can recompute them; a writer's seqs never repeat, so
a record names the append that wrote it (unless it is cut short inside its header), and an
LSN that `truncate_back` freed and a later append took again holds other bytes. Protocol
on stdout, one line per event, flushed as it is written:

    open FIRST_LSN LAST_LSN   once, right after the log is open, before any append
    + WRITER SEQ K            before a unit of K records (seqs SEQ..SEQ+K-1) is appended
    LSN WRITER SEQ            once the unit is acknowledged: one line per record
    T? LSN                    before `truncate_front(LSN)` is called (--truncate)
    T LSN                     once that `truncate_front(LSN)` returned
    R FIRST LAST              in the `on_segment_drop` hook (--retention), as it lets the
                              segment holding LSNs FIRST..LAST go: its drop comes next
    B? LSN                    before `truncate_back(LSN)` is called (--truncate-back)
    B LSN                     once that `truncate_back(LSN)` returned
    B- LSN                    instead, if it was refused because `truncate_front` had moved
                              `first_lsn` above LSN + 1 meanwhile (nothing changed)
    T- LSN                    instead of `T LSN`, if `truncate_front(LSN)` was refused
                              because a `truncate_back` had cut below LSN - 1 meanwhile

A unit's acknowledgement lines are written with one `write` (atomic on a pipe), so after
SIGKILL a reader of the pipe sees all of them or none. Meanwhile N reader coroutines
(default 2) read stretches of the log as it grows and check every record they get; a
`TruncatedError` is fine if the LSN the read was at is below `first_lsn` by then, or a
`truncate_back` that may have run since the read began removed it; none may give a
record that a `truncate_back` which returned removed.

`--truncate` adds a coroutine that calls `truncate_front` every few milliseconds, at an
LSN from `first_lsn - 50` to `last_lsn + 1` (mostly keeping up to the last 3000 records,
now and then everything or nothing), and now and then `apply_retention()`. `--retention`
opens the log with `retention_bytes=BYTES` and a hook that sometimes takes a while (as an
archiver copying the file would) and sometimes vetoes the drop. `--truncate-back` adds a
coroutine that calls `truncate_back` every few milliseconds at the end of a unit it saw
acknowledged (mostly a few records below `last_lsn`, now and then deeper, everything
(`first_lsn - 1`) or nothing (`last_lsn`)). Appends queued before the call are written and
acknowledged before the cut (their acknowledgement lines come before `B LSN`), appends
made while it runs follow it (theirs come after): so the pipe orders every
acknowledgement before or after each cut, as it happened. With `--die-in-cut STEP`, the
writer SIGKILLs itself just before the STEP-th call that changes a file (write, fdatasync,
unlink, rename...) that its I/O thread makes in its third `truncate_back` (or once that
returned): a kill -9 at an exact step of the cut, where a timed kill rarely lands. Any
error exits with a traceback on stderr; a healthy writer prints nothing on stderr and
never exits by itself (but for --die-in-cut).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import walasync

SEGMENT_SIZE = 64 * 1024
MAX_SIZE = 2000
_HEADER_END = b"|"


def _rng(*key: object) -> random.Random:
    return random.Random("/".join(map(str, key)))  # str seeds hash the same in every process


def writer_options(run: int, durability: str = "fsync") -> dict[str, Any]:
    """The options the writer of `run` opens the log with (varied to vary batching)."""
    rng = _rng("options", run)
    return {
        "segment_size": SEGMENT_SIZE,
        "durability": durability,
        "max_batch_bytes": rng.choice([4 << 20, 32 * 1024, 8 * 1024]),
        "max_pending_bytes": rng.choice([64 << 20, 256 * 1024, 16 * 1024]),
        "max_batch_delay": rng.choice([0.0, 0.0, 0.001]),
    }


def unit_length(run: int, writer: int, seq: int) -> int:
    """How many records the unit that starts at `seq` has (1: `append`, 2-5: `append_many`)."""
    rng = _rng("unit", run, writer, seq)
    return rng.randint(2, 5) if rng.random() < 0.2 else 1


def record(run: int, writer: int, seq: int) -> bytes:
    """The record `writer` of `run` appends as number `seq`: 0..2000 bytes.

    It starts with "RUN/WRITER/SEQ|" and goes on with bytes drawn from a generator seeded by
    the same triple; short records are cut off inside that header, and some are empty.
    """
    rng = _rng("record", run, writer, seq)
    size = rng.randint(0, 12) if rng.random() < 0.15 else rng.randint(0, MAX_SIZE)
    head = b"%d/%d/%d" % (run, writer, seq) + _HEADER_END
    return (head + rng.randbytes(max(size - len(head), 0)))[:size]


def check_record(data: bytes) -> None:
    """Raise unless `data` is the record its header names (a header cut short passes)."""
    head, sep, _ = data.partition(_HEADER_END)
    if not sep:
        return
    try:
        run, writer, seq = map(int, head.split(b"/"))
    except ValueError:
        raise AssertionError(f"not a record: {data[:40]!r}") from None
    if data != record(run, writer, seq):
        raise AssertionError(f"record {run}/{writer}/{seq} has the wrong content")


# A bug fixed since (tests/test_cut_races.py) that the readers here ran into within a few
# rounds: a read reaching records that a truncate_back was removing raised CorruptionError
# (zeroed records) or WalError (ENOENT: a deleted segment) instead of TruncatedError.
# True tolerates it while a cut may have run since the read began.
CUT_READ_BUG = False


class DyingIO(walasync.FileIO):
    """FileIO that SIGKILLs its process before the `countdown`-th call that changes a file
    (counting the outermost call only: `write_durable` writes and syncs) made by a
    `truncate_back` on the log's I/O thread, once `countdown` is set."""

    countdown: int | None = None
    _depth = 0  # calls of these methods running on the I/O thread (nested: write_durable)

    def _step(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name[:11] != "walasync-io":
            return call(*args, **kwargs)
        if self.countdown is not None and not self._depth:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_name != "truncate_back":
                frame = frame.f_back  # type: ignore[assignment]
            if frame is not None:  # the cut's own step, not a batch written before it
                self.countdown -= 1
                if self.countdown <= 0:
                    os.kill(os.getpid(), signal.SIGKILL)
        self._depth += 1
        try:
            return call(*args, **kwargs)
        finally:
            self._depth -= 1

    def open(self, path: str, *, create: bool = False) -> int:
        if create:
            return int(self._step(super().open, path, create=True))
        return super().open(path)

    def pwritev(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
        self._step(super().pwritev, fd, buffers, offset)

    def write_durable(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
        self._step(super().write_durable, fd, buffers, offset)

    def zero_fill(self, fd: int, start: int, end: int) -> None:
        self._step(super().zero_fill, fd, start, end)

    def preallocate(self, fd: int, size: int) -> None:
        self._step(super().preallocate, fd, size)

    def fdatasync(self, fd: int) -> None:
        self._step(super().fdatasync, fd)

    def fsync_dir(self, path: str) -> None:
        self._step(super().fsync_dir, path)

    def truncate(self, fd: int, size: int) -> None:
        self._step(super().truncate, fd, size)

    def rename(self, src: str, dst: str) -> None:
        self._step(super().rename, src, dst)

    def unlink(self, path: str) -> None:
        self._step(super().unlink, path)


class Cuts:
    """What the coroutines of a writer with --truncate-back share."""

    def __init__(self, wal: walasync.Wal) -> None:
        # LSNs that end an acknowledged unit and were not removed since: valid cut points.
        # (`last_lsn` always ends a batch, so it ends a unit.)
        self.ends = {wal.last_lsn}
        self.removed: list[int] = []  # LSN + 1 of every truncate_back(LSN) called
        self.running = False  # one is running: the last of `removed` may not be done
        self.acked: dict[int, tuple[int, int]] = {}  # LSN -> (writer, seq) acknowledged
        self.gone: set[tuple[int, int]] = set()  # (writer, seq) removed by a returned cut

    def since(self) -> int:
        """An index into `removed`: the cuts from it on may still remove records."""
        return len(self.removed) - self.running

    def cut(self, lsn: int) -> None:
        """truncate_back(lsn) returned: what it removed is gone."""
        self.ends = {e for e in self.ends if e <= lsn}
        for n in [n for n in self.acked if n > lsn]:
            self.gone.add(self.acked.pop(n))

    def check(self, run: int, lsn: int, data: bytes) -> None:
        """Raise if a read gave a record that a truncate_back which returned removed."""
        head, sep, _ = data.partition(_HEADER_END)
        if sep and (ids := tuple(map(int, head.split(b"/"))))[0] == run and ids[1:] in self.gone:
            raise AssertionError(f"a read gave LSN {lsn}, {ids}, which truncate_back removed")


def _emit(text: str) -> None:
    sys.stdout.write(text)  # line-buffered: flushed at once, in one write()


async def _appender(wal: walasync.Wal, run: int, writer: int, cuts: Cuts | None) -> None:
    seq = 0
    while True:
        k = unit_length(run, writer, seq)
        records = [record(run, writer, s) for s in range(seq, seq + k)]
        _emit(f"+ {writer} {seq} {k}\n")
        if k == 1:
            data: bytes | bytearray | memoryview = records[0]
            if seq % 7 == 3:  # the other buffer types take the copying path
                data = bytearray(data) if seq % 2 else memoryview(data)
            first = await wal.append(data)
            lsns = range(first, first + 1)
        else:
            lsns = await wal.append_many(records)
        if len(lsns) != k:
            raise AssertionError(f"append_many of {k} records returned {lsns}")
        seqs = range(seq, seq + k)
        _emit("".join(f"{lsn} {writer} {s}\n" for lsn, s in zip(lsns, seqs, strict=True)))
        if cuts is not None:
            cuts.ends.add(lsns[-1])
            cuts.acked.update(zip(lsns, ((writer, s) for s in seqs), strict=True))
        seq += k


async def _reader(wal: walasync.Wal, run: int, reader: int, cuts: Cuts | None) -> None:
    """Read while the appenders append: recent stretches, now and then from `first_lsn`
    or from LSN 1 (below `first_lsn` once the log was truncated). A `TruncatedError` is
    right if `first_lsn` passed the LSN the read was at, or a `truncate_back` that may have
    run since the read began removed it."""
    rng = _rng("reader", run, reader)
    while True:
        await asyncio.sleep(rng.uniform(0, 0.005))
        last = wal.last_lsn
        r = rng.random()
        start = (
            1
            if r < 0.05
            else wal.first_lsn
            if r < 0.15
            else rng.randint(max(1, last - 1000), last + 1)
        )
        end = None if rng.random() < 0.7 else start + rng.randint(0, 300)
        expected = range(start, last + 1 if end is None else min(end, last) + 1)
        since = cuts.since() if cuts is not None else 0
        got = 0
        try:
            async for rec in wal.read(start, end):  # snapshot: up to last_lsn as of this call
                if rec.lsn != expected.start + got:
                    raise AssertionError(f"read({start}, {end}) gave LSN {rec.lsn} at {got}")
                check_record(rec.data)
                if cuts is not None:
                    cuts.check(run, rec.lsn, rec.data)
                got += 1
        except walasync.TruncatedError:
            # Raised by `read` itself, or during the iteration once a truncation overtook
            # it: either way the record it was about to give must be gone by now.
            removed = cuts.removed[since:] if cuts is not None else []
            if wal.first_lsn <= start + got and not any(r <= start + got for r in removed):
                raise AssertionError(
                    f"read({start}, {end}) raised TruncatedError at LSN {start + got}, but "
                    f"first_lsn is {wal.first_lsn}"
                ) from None
            continue
        except walasync.WalError as exc:  # CorruptionError, or a vanished file's ENOENT
            if not (CUT_READ_BUG and cuts is not None and len(cuts.removed) > since):
                raise
            if not isinstance(exc, walasync.CorruptionError) and "No such file" not in str(exc):
                raise
            continue
        if got != len(expected):
            raise AssertionError(f"read({start}, {end}) gave {got} records, not {expected}")


def truncation_point(rng: random.Random, first: int, last: int) -> int:
    """An LSN for `truncate_front`, valid when `first_lsn` is `first` and `last_lsn` is
    `last`: mostly one that keeps up to the last 3000 records (or a short step from
    `first`), now and then everything, or one at or below `first` (nothing to do)."""
    r = rng.random()
    if r < 0.04:
        return last + 1
    if r < 0.15:
        return rng.randint(max(1, first - 50), first)
    if r < 0.4:
        return rng.randint(first, min(first + 50, last + 1))
    return max(first, last + 1 - rng.randint(0, 3000))


async def _truncator(wal: walasync.Wal, run: int, retention: bool) -> None:
    """Every few milliseconds, `truncate_front` (or, with retention, now and then an
    `apply_retention` pass), announced before and after on stdout."""
    rng = _rng("truncate", run)
    while True:
        await asyncio.sleep(rng.uniform(0.001, 0.01))
        if retention and rng.random() < 0.1:
            await wal.apply_retention()  # the hook announces each drop
            continue
        lsn = truncation_point(rng, wal.first_lsn, wal.last_lsn)
        _emit(f"T? {lsn}\n")
        try:
            await wal.truncate_front(lsn)
        except ValueError:
            if lsn <= wal.last_lsn + 1:  # still valid: no truncate_back explains it
                raise
            _emit(f"T- {lsn}\n")
            continue
        if not lsn <= wal.first_lsn <= wal.last_lsn + 1:
            raise AssertionError(
                f"truncate_front({lsn}) returned with first_lsn {wal.first_lsn}, "
                f"last_lsn {wal.last_lsn}"
            )
        _emit(f"T {lsn}\n")


def cut_point(rng: random.Random, first: int, last: int, ends: set[int]) -> int:
    """An LSN for `truncate_back`, valid when `first_lsn` is `first` and `last_lsn` is
    `last`, from `ends` (unit ends): mostly one at most 60 records below `last`, now and
    then up to 1000 records below, everything (`first - 1`) or nothing (`last`)."""
    r = rng.random()
    if r < 0.02:
        return first - 1
    if r < 0.1:
        return last
    valid = sorted(e for e in ends if max(first - 1, last - 1000) <= e <= last)
    if r < 0.2:
        return rng.choice(valid) if valid else last
    below = [e for e in valid if e >= last - rng.randint(0, 60)]
    return below[0] if below else last


async def _cutter(
    wal: walasync.Wal, run: int, cuts: Cuts, io: DyingIO | None, die_at: int | None
) -> None:
    """Every few milliseconds, `truncate_back` at a unit end, announced before and after
    on stdout; with `die_at`, the third one is the last (see --die-in-cut)."""
    rng = _rng("cut", run)
    for n in itertools.count():
        await asyncio.sleep(rng.uniform(0.004, 0.03))
        lsn = cut_point(rng, wal.first_lsn, wal.last_lsn, cuts.ends)
        _emit(f"B? {lsn}\n")
        if io is not None and n == 2:
            io.countdown = die_at
        cuts.removed.append(lsn + 1)
        cuts.running = True
        try:
            await wal.truncate_back(lsn)
        except ValueError:
            if lsn >= wal.first_lsn - 1:  # still valid: no truncate_front explains it
                raise
            _emit(f"B- {lsn}\n")
            continue
        finally:
            cuts.running = False
        if wal.last_lsn != lsn:  # what follows the cut goes out only after it returned
            raise AssertionError(f"truncate_back({lsn}) returned with last_lsn {wal.last_lsn}")
        cuts.cut(lsn)
        _emit(f"B {lsn}\n")
        if io is not None and io.countdown is not None:
            os.kill(os.getpid(), signal.SIGKILL)  # it had fewer steps than that


def drop_hook(run: int) -> Callable[[walasync.SegmentInfo], Awaitable[bool | None]]:
    """The `on_segment_drop` hook of the writer of `run`: it vetoes one drop in ten, takes
    up to 3 ms for some (an archiver's copy), and announces each drop it lets happen."""
    rng = _rng("drop", run)

    async def hook(segment: walasync.SegmentInfo) -> bool | None:
        if rng.random() < 0.1:
            return False  # keep it (and every later one) this time
        if rng.random() < 0.3:
            await asyncio.sleep(rng.uniform(0, 0.003))
        _emit(f"R {segment.first_lsn} {segment.last_lsn}\n")
        return None

    return hook


async def _main(args: argparse.Namespace) -> None:
    retention: dict[str, Any] = {}
    if args.retention is not None:
        retention = {"retention_bytes": args.retention, "on_segment_drop": drop_hook(args.run)}
    io = DyingIO() if args.die_in_cut is not None else None
    options = writer_options(args.run, args.durability)
    wal = await walasync.open(args.dir, io=io, **options, **retention)
    _emit(f"open {wal.first_lsn} {wal.last_lsn}\n")
    lifecycle = [_truncator(wal, args.run, bool(retention))] if args.truncate else []
    cuts = Cuts(wal) if args.truncate_back else None
    if cuts is not None:
        lifecycle.append(_cutter(wal, args.run, cuts, io, args.die_in_cut))
    # Never returns: the first task to fail ends the process with its traceback.
    await asyncio.gather(
        *(_appender(wal, args.run, w, cuts) for w in range(args.writers)),
        *(_reader(wal, args.run, r, cuts) for r in range(args.readers)),
        *lifecycle,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("dir")
    parser.add_argument("run", type=int)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--durability", choices=["fsync", "interval", "none"], default="fsync")
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--truncate", action="store_true", help="truncate_front as it goes")
    parser.add_argument("--retention", type=int, metavar="BYTES", help="retention_bytes")
    parser.add_argument("--truncate-back", action="store_true", help="truncate_back as it goes")
    parser.add_argument("--die-in-cut", type=int, metavar="STEP", help="SIGKILL in a cut")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(_main(args))
    else:
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()

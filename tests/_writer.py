"""Crash-test writer: appends deterministic records to a log forever, until it is killed.

Usage: python tests/_writer.py DIR RUN [--loop asyncio|uvloop] [--durability MODE]
                               [--writers N] [--readers N]

`RUN` (an int) names this process's run: it seeds the options and is part of every record,
so records of different runs never look alike. Each of the N appender coroutines (default
64) appends units, one after another, forever: a unit is one record (`append`) or 2-5
records (`append_many`), and both its length and its records' content are functions of
(run, writer, seq) alone, so a test can recompute them. Protocol on stdout, one line per
event, flushed as it is written:

    open FIRST_LSN LAST_LSN   once, right after the log is open, before any append
    + WRITER SEQ K            before a unit of K records (seqs SEQ..SEQ+K-1) is appended
    LSN WRITER SEQ            once the unit is acknowledged: one line per record

A unit's acknowledgement lines are written with one `write` (atomic on a pipe), so after
SIGKILL a reader of the pipe sees all of them or none. Meanwhile N reader coroutines
(default 2) read stretches of the log as it grows and check every record they get. Any
error exits with a traceback on stderr; a healthy writer prints nothing on stderr and
never exits by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
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


def _emit(text: str) -> None:
    sys.stdout.write(text)  # line-buffered: flushed at once, in one write()


async def _appender(wal: walasync.Wal, run: int, writer: int) -> None:
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
        seq += k


async def _reader(wal: walasync.Wal, run: int, reader: int) -> None:
    """Read while the appenders append: recent stretches, and now and then from LSN 1."""
    rng = _rng("reader", run, reader)
    while True:
        await asyncio.sleep(rng.uniform(0, 0.005))
        last = wal.last_lsn
        start = 1 if rng.random() < 0.05 else rng.randint(max(1, last - 1000), last + 1)
        end = None if rng.random() < 0.7 else start + rng.randint(0, 300)
        expected = range(start, last + 1 if end is None else min(end, last) + 1)
        got = 0
        async for rec in wal.read(start, end):  # snapshot: up to last_lsn as of this call
            if rec.lsn != expected.start + got:
                raise AssertionError(f"read({start}, {end}) gave LSN {rec.lsn} at {got}")
            check_record(rec.data)
            got += 1
        if got != len(expected):
            raise AssertionError(f"read({start}, {end}) gave {got} records, not {expected}")


async def _main(args: argparse.Namespace) -> None:
    wal = await walasync.open(args.dir, **writer_options(args.run, args.durability))
    _emit(f"open {wal.first_lsn} {wal.last_lsn}\n")
    # Never returns: the first task to fail ends the process with its traceback.
    await asyncio.gather(
        *(_appender(wal, args.run, w) for w in range(args.writers)),
        *(_reader(wal, args.run, r) for r in range(args.readers)),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("dir")
    parser.add_argument("run", type=int)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--durability", choices=["fsync", "interval", "none"], default="fsync")
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--readers", type=int, default=2)
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(_main(args))
    else:
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()

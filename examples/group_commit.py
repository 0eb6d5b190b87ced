"""Group commit: 1000 concurrent appenders, a handful of fdatasyncs.

    python examples/group_commit.py [DIR]     # walasync installed, or PYTHONPATH=. in a checkout

Every `append` returns only once its record is durable, yet concurrent appends do not
queue up behind one another's fdatasync: walasync writes everything pending in one batch
and makes it durable with one fdatasync, so throughput grows with the number of writers.
This appends 1000 records from 1000 coroutines at once, then 100 records one after the
other for comparison, then reopens the log to check that every returned LSN is there.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time

import walasync

WRITERS = 1000
SEQUENTIAL = 100


def payload(i: int) -> bytes:
    return b"order %05d: 3 x widget, shipped" % i


async def main(path: str) -> None:
    async with walasync.open(path) as wal:
        first = wal.last_lsn + 1

        start = time.perf_counter()
        lsns = await asyncio.gather(*(wal.append(payload(i)) for i in range(WRITERS)))
        elapsed = time.perf_counter() - start
        print(
            f"{WRITERS} concurrent appends: {elapsed * 1000:.1f} ms, "
            f"{WRITERS / elapsed:,.0f} records/s"
        )
        # LSNs are dense: the 1000 appends got exactly the next 1000 LSNs.
        assert sorted(lsns) == list(range(first, first + WRITERS)), "LSNs are not dense"

        start = time.perf_counter()
        for i in range(SEQUENTIAL):
            await wal.append(b"sequential %d" % i)
        elapsed = time.perf_counter() - start
        print(
            f"{SEQUENTIAL} sequential appends: {elapsed * 1000:.1f} ms, "
            f"{SEQUENTIAL / elapsed:,.0f} records/s (one fdatasync each)"
        )

    # Each LSN was durable when append returned: reopen the log and find every record.
    async with walasync.open(path) as wal:
        stored = {record.lsn: record.data async for record in wal.read(start=first)}
    missing = [lsn for i, lsn in enumerate(lsns) if stored.get(lsn) != payload(i)]
    if missing:
        sys.exit(f"records not found after reopening: LSNs {missing[:10]}")
    print(f"all {WRITERS} returned LSNs are durable: reopened the log and read each one back")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        asyncio.run(main(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(f"{tmp}/log"))

"""Quickstart: open a log, append records, append a group atomically, read them back.

    python examples/quickstart.py [DIR]     # walasync installed, or PYTHONPATH=. in a checkout

DIR is the log's directory (created if needed; default: a temporary one). Run it twice on
the same DIR and the second run finds the first run's records and goes on after them.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile

import walasync


async def main(path: str) -> None:
    async with walasync.open(path) as wal:
        print(f"opened {wal.path}: {wal.last_lsn} records already there")

        # append() returns once the record is on disk (fdatasync'd): it survives a crash.
        lsn = await wal.append(b"hello, write-ahead log")
        print(f"append      -> LSN {lsn}")

        # append_many() is atomic: after a crash, all of these records are there or none.
        lsns = await wal.append_many([b"debit alice 10", b"credit bob 10"])
        print(f"append_many -> LSNs {lsns.start}..{lsns.stop - 1}")

        print(f"first_lsn={wal.first_lsn} last_lsn={wal.last_lsn}")
        async for record in wal.read(start=lsn):
            print(f"  {record.lsn}: {record.data.decode()}")

    # Reopening recovers the log: every acknowledged record is still there.
    async with walasync.open(path) as wal:
        records = [record async for record in wal.read()]
        print(f"reopened: {len(records)} records, last_lsn={wal.last_lsn}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        asyncio.run(main(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(f"{tmp}/log"))

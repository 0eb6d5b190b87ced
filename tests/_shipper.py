"""A service that appends and replicates until it is killed (for `test_jetstream.py`).

Usage: python tests/_shipper.py DIR STREAM URL [URL...]

Opens the log in DIR, starts a `Replicator` to STREAM (created R3 if missing), and runs
16 appender coroutines appending 100-byte records forever. Prints `acked N` (flushed) each
time the stream has acknowledged 500 more records, so a test can kill it mid-flight.
"""

from __future__ import annotations

import asyncio
import sys

import walasync
from walasync.jetstream import Replicator


async def main(path: str, stream: str, urls: list[str]) -> None:
    async with walasync.open(path, max_record_size=1 << 20) as wal:
        rep = Replicator(wal, urls, stream=stream, create=True, window=8, pack_bytes=4096)
        async with rep:

            async def appender(k: int) -> None:
                n = 0
                while True:
                    await wal.append(b"%02d-%08d-" % (k, n) + b"s" * 88)
                    n += 1

            tasks = [asyncio.ensure_future(appender(k)) for k in range(16)]
            reported = 0
            while True:
                await asyncio.sleep(0.01)
                if rep.acked_lsn >= reported + 500:
                    reported = rep.acked_lsn
                    print(f"acked {reported}", flush=True)
                if rep.failure is not None:
                    raise rep.failure
                for task in tasks:
                    if task.done():
                        task.result()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))

"""Test a service against power loss with walasync.testing.SimulatedDisk.

A tiny account service logs transfers; the test crashes the simulated disk before every
I/O step of a workload, recovers each image with the real walasync code, and checks the
service's invariant: every acknowledged transfer is there, and balances always add up.

    python examples/crash_testing.py
"""

from __future__ import annotations

import asyncio

import walasync
from walasync.testing import SimulatedDisk

LOG = "/data/accounts.wal"


async def transfer(wal: walasync.Wal, src: str, dst: str, amount: int) -> range:
    """Debit and credit as one atomic unit: after a crash both are there or neither."""
    return await wal.append_many([f"{src} -{amount}".encode(), f"{dst} +{amount}".encode()])


async def balances(wal: walasync.Wal) -> dict[str, int]:
    totals: dict[str, int] = {}
    async for record in wal.read():
        name, amount = record.data.decode().split()
        totals[name] = totals.get(name, 0) + int(amount)
    return totals


async def main() -> None:
    disk = SimulatedDisk.from_files({}, dirs=["/data"])
    images: list[tuple[int, SimulatedDisk]] = []  # (transfers acknowledged, power-loss image)
    acknowledged = 0

    def before_each_step(step: int, op: str) -> None:
        images.append((acknowledged, disk.crash()))

    disk.on_step = before_each_step
    async with walasync.open(LOG, io=disk, segment_size=4096) as wal:
        for i in range(30):
            await transfer(wal, "alice", "bob", i)
            acknowledged += 1
    disk.on_step = None

    for acked, image in images:
        async with walasync.open(LOG, io=image, segment_size=4096) as wal:
            assert wal.last_lsn >= 2 * acked, "an acknowledged transfer was lost"
            assert sum((await balances(wal)).values()) == 0, "a transfer was half applied"
    print(f"{len(images)} power-loss images recovered: no acknowledged transfer lost, every")
    print("transfer all or nothing")


if __name__ == "__main__":
    asyncio.run(main())

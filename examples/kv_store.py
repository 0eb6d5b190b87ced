"""A tiny durable key-value store on `walasync.StateLog`: the dict is rebuilt by replay.

    python examples/kv_store.py [DIR]     # walasync installed, or PYTHONPATH=. in a checkout

Every change is an event (`{"op": "set", "key": ..., "value": ...}`) that `StateLog.apply`
makes durable before it changes the dict. Opening loads the latest snapshot of the dict
and replays the events logged after it; once 15 events have piled up since, a checkpoint
writes the dict to a new snapshot and drops those events from the log. Run it three times
on the same DIR: the second run replays the first one's events and checkpoints, the third
starts from that snapshot; each remembers the runs before (its run counter goes up, the
balances it moved stay moved).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from typing import Any

import walasync

Event = dict[str, Any]


def apply_change(data: dict[str, str], event: Event) -> dict[str, str]:
    """The only code that changes the dict: live, and again on replay."""
    op = event["op"]
    if op == "set":
        data[event["key"]] = event["value"]
    elif op == "del":
        data.pop(event["key"], None)
    elif op == "set_many":
        data.update(event["items"])
    else:
        raise ValueError(f"unknown operation {op!r}")
    return data


class KVStore:
    """A dict whose every change is logged first."""

    def __init__(self, state: walasync.StateLog[dict[str, str], Event]) -> None:
        self._state = state

    @classmethod
    async def open(cls, path: str) -> KVStore:
        return cls(
            await walasync.StateLog.open(
                path, initial=dict, apply=apply_change, checkpoint_records=15
            )
        )

    def describe(self) -> str:
        s = self._state
        snapshot = f"snapshot at LSN {s.snapshot_lsn}" if s.snapshot_lsn else "no snapshot"
        return f"{snapshot}, {s.last_lsn - s.snapshot_lsn} events replayed"

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._state.state.get(key, default)

    def items(self) -> list[tuple[str, str]]:
        return sorted(self._state.state.items())

    async def set(self, key: str, value: str) -> None:
        await self._state.apply({"op": "set", "key": key, "value": value})

    async def delete(self, key: str) -> None:
        await self._state.apply({"op": "del", "key": key})

    async def set_many(self, items: dict[str, str]) -> None:
        """Set several keys atomically: one event, so after a crash all are set or none."""
        await self._state.apply({"op": "set_many", "items": items})

    async def checkpoint_if_due(self) -> int | None:
        """Snapshot the dict once enough events piled up; the LSN it covers, if it did."""
        if not self._state.should_checkpoint:
            return None
        return await self._state.checkpoint()

    async def close(self) -> None:
        await self._state.close()


async def main(path: str) -> None:
    kv = await KVStore.open(path)
    try:
        print(f"opened: {kv.describe()}: {dict(kv.items())}")

        runs = int(kv.get("runs", "0") or "0") + 1
        await kv.set("runs", str(runs))
        await kv.set("greeting", f"hello from run {runs}")
        await kv.delete("scratch")
        await kv.set("scratch", "temporary")
        await kv.delete("scratch")

        # Move 10 from alice to bob: both balances change, or (after a crash) neither.
        alice = int(kv.get("alice", "100") or "0")
        bob = int(kv.get("bob", "0") or "0")
        await kv.set_many({"alice": str(alice - 10), "bob": str(bob + 10)})

        # Concurrent writers share fsyncs; each change is applied in log order.
        await asyncio.gather(*(kv.set(f"sensor{i}", f"{20 + i}.5C") for i in range(5)))

        print(f"after run {runs}:")
        for key, value in kv.items():
            print(f"  {key} = {value}")
        covered = await kv.checkpoint_if_due()
        if covered is not None:
            print(f"checkpoint: the snapshot holds events 1..{covered}; the log dropped them")
    finally:
        await kv.close()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        asyncio.run(main(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(f"{tmp}/kv"))

"""A tiny durable key-value store: the log is the database, the dict is a cache of it.

    python examples/kv_store.py [DIR]     # walasync installed, or PYTHONPATH=. in a checkout

Every change is a log record ("set KEY VALUE" or "del KEY"), applied to the in-memory dict
only once `append` has made it durable. On startup the store replays the whole log into
the dict. Run it twice on the same DIR and the second run remembers the first: its run
counter goes up and the balances it moved are still moved.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile

import walasync


class KVStore:
    """A dict whose every change is logged first."""

    def __init__(self, wal: walasync.Wal) -> None:
        self._wal = wal
        self._data: dict[str, str] = {}
        self._version: dict[str, int] = {}  # key -> LSN of its latest change

    @classmethod
    async def open(cls, path: str) -> KVStore:
        store = cls(await walasync.open(path))
        async for record in store._wal.read():  # replay: the log is the source of truth
            store._apply(record.lsn, record.data)
        return store

    @property
    def replayed(self) -> int:
        return self._wal.last_lsn

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._data.get(key, default)

    def items(self) -> list[tuple[str, str]]:
        return sorted(self._data.items())

    async def set(self, key: str, value: str) -> None:
        await self._log([_encode_set(key, value)])

    async def delete(self, key: str) -> None:
        await self._log([b"del " + key.encode()])

    async def set_many(self, items: dict[str, str]) -> None:
        """Set several keys atomically: after a crash, all of them are set or none."""
        await self._log([_encode_set(k, v) for k, v in items.items()])

    async def close(self) -> None:
        await self._wal.close()

    async def _log(self, records: list[bytes]) -> None:
        lsns = await self._wal.append_many(records)
        for lsn, data in zip(lsns, records, strict=True):
            self._apply(lsn, data)

    def _apply(self, lsn: int, data: bytes) -> None:
        op, _, rest = data.decode().partition(" ")
        key, _, value = rest.partition(" ")
        if self._version.get(key, 0) > lsn:
            return  # a concurrent, later change to this key was applied first
        self._version[key] = lsn
        if op == "set":
            self._data[key] = value
        elif op == "del":
            self._data.pop(key, None)
        else:
            raise ValueError(f"LSN {lsn}: unknown operation {data!r}")


def _encode_set(key: str, value: str) -> bytes:
    if not key or " " in key:
        raise ValueError(f"a key must be non-empty and have no spaces: {key!r}")
    return f"set {key} {value}".encode()


async def main(path: str) -> None:
    kv = await KVStore.open(path)
    try:
        print(f"replayed {kv.replayed} records: {dict(kv.items())}")

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

        # Concurrent writers are fine: each set is durable before it is applied.
        await asyncio.gather(*(kv.set(f"sensor{i}", f"{20 + i}.5C") for i in range(5)))

        print(f"after run {runs}:")
        for key, value in kv.items():
            print(f"  {key} = {value}")
    finally:
        await kv.close()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        asyncio.run(main(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(f"{tmp}/kv"))

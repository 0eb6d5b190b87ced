"""Event sourcing on a keyed log: streams of events, a projection rebuilt, a live one.

    python examples/event_sourcing.py [DIR]   # walasync installed, or PYTHONPATH=. in a checkout

Each bank account is a stream: its events are keyed records under the account's name, so
`kv.records_for(account)` loads one account's history without scanning the log. A command
rebuilds the account from its stream, checks it (no overdraft), then appends its event; a
transfer appends both accounts' events as one atomic unit (`append_many`).

Two projections of every account's balance:

- live: a task that follows the log (`kv.read(follow=True)`), started before this run's
  first command: it catches up with the events of earlier runs, then applies each new
  event once it is durable;
- rebuilt: from nothing, with `kv.read()` over every event, at the end.

They agree. Run it twice on the same DIR and the second run starts from the first's balances.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from collections import defaultdict
from typing import Any

import walasync


def evolve(balance: int | None, event: bytes) -> int | None:
    """An account's balance after one of its events (None: not opened)."""
    data = json.loads(event)
    if data["type"] == "opened":
        return 0
    if data["type"] == "deposited":
        return (balance or 0) + int(data["amount"])
    if data["type"] == "withdrawn":
        return (balance or 0) - int(data["amount"])
    return balance


class Balances:
    """A projection: every account's balance, as of the events up to `position`."""

    def __init__(self) -> None:
        self.balances: dict[str, int | None] = {}
        self.position = 0  # LSN of the last event applied
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def apply(self, event: walasync.KeyedRecord) -> None:
        assert event.value is not None and isinstance(event.key, str)
        self.balances[event.key] = evolve(self.balances.get(event.key), event.value)
        self.position = event.lsn
        for lsn, fut in self._waiters:
            if lsn <= self.position and not fut.done():
                fut.set_result(None)

    async def reached(self, lsn: int) -> None:
        """Wait until the events up to `lsn` are applied."""
        if self.position < lsn:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((lsn, fut))
            await fut


class Bank:
    """Commands: each checks the account's state (from its own stream) and appends events."""

    def __init__(self, kv: walasync.KeyedLog) -> None:
        self.kv = kv
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def balance(self, account: str) -> int | None:
        """The account rebuilt from its own stream: None if it was never opened."""
        balance = None
        async for event in self.kv.records_for(account):
            balance = evolve(balance, event.value or b"")
        return balance

    async def open(self, account: str) -> bool:
        async with self._locks[account]:
            if self.kv.latest_lsn(account) is not None:
                return False
            await self.kv.append(account, _event("opened"))
            return True

    async def deposit(self, account: str, amount: int) -> None:
        async with self._locks[account]:
            if await self.balance(account) is None:
                raise ValueError(f"no account {account!r}")
            await self.kv.append(account, _event("deposited", amount))

    async def withdraw(self, account: str, amount: int) -> bool:
        async with self._locks[account]:
            if (await self.balance(account) or 0) < amount:
                return False  # rejected: no event
            await self.kv.append(account, _event("withdrawn", amount))
            return True

    async def transfer(self, source: str, target: str, amount: int) -> bool:
        """Both events or neither, even across a crash."""
        first, second = sorted((source, target))
        async with self._locks[first], self._locks[second]:
            if (await self.balance(source) or 0) < amount or await self.balance(target) is None:
                return False
            await self.kv.append_many(
                [(source, _event("withdrawn", amount)), (target, _event("deposited", amount))]
            )
            return True


def _event(kind: str, amount: int = 0, **more: Any) -> bytes:
    return json.dumps({"type": kind, "amount": amount, **more}).encode()


async def main(path: str) -> None:
    async with walasync.open_keyed(path) as kv:
        before = kv.last_lsn
        live = Balances()

        async def follow() -> None:
            async for event in kv.read(follow=True):  # history first, then new events
                live.apply(event)

        follower = asyncio.ensure_future(follow())
        await live.reached(before)
        print(f"live projection caught up with {before} earlier events: {live.balances}")

        bank = Bank(kv)
        for account in ("alice", "bob", "carol"):
            if await bank.open(account):
                print(f"opened {account}")
        await bank.deposit("alice", 100)
        await asyncio.gather(*(bank.deposit("bob", 5) for _ in range(10)))  # 10 concurrent
        print(
            "withdraw 500 from carol:", "done" if await bank.withdraw("carol", 500) else "rejected"
        )
        print(
            "transfer 30 alice -> carol:",
            "done" if await bank.transfer("alice", "carol", 30) else "rejected",
        )
        print("withdraw 20 from carol:", "done" if await bank.withdraw("carol", 20) else "rejected")

        await live.reached(kv.last_lsn)
        rebuilt = Balances()
        async for event in kv.read():
            rebuilt.apply(event)
        print(f"events in the log: {kv.last_lsn}")
        for account in sorted(rebuilt.balances):
            history = [json.loads(e.value or b"")["type"] async for e in kv.records_for(account)]
            print(f"  {account}: {rebuilt.balances[account]} ({len(history)} events)")
        same = live.balances == rebuilt.balances and live.position == rebuilt.position
        print("live projection == rebuilt projection:", same)
        if not same:
            raise SystemExit("the projections disagree")
    await follower  # it ends once the log is closed


if __name__ == "__main__":
    if len(sys.argv) > 1:
        asyncio.run(main(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(f"{tmp}/events"))

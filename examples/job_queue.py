"""A durable job queue on `walasync.StateLog`: no enqueued job is lost, even to kill -9.

    python examples/job_queue.py [DIR]             # a demo: 20 jobs, 3 workers
    python examples/job_queue.py DIR --forever     # producers and workers until killed

Enqueueing a job and acknowledging it are events; the state is the jobs not yet done (in
the order they came). `enqueue` returns once the job is durable. A worker takes the oldest
job nobody is working on, does it, and acknowledges it; which jobs are taken is kept in
memory only, so after a crash a job taken but not acknowledged is handed out again (at
least once). A checkpoint writes the pending jobs to the snapshot and drops from the log
the records of every job that was done. Events are pickled (`serializer=pickle`).

With `--forever`, it prints `enqueue? PAYLOAD` before it enqueues a job, `enqueued ID
PAYLOAD` once the job is durable, `ack? ID` before acknowledging it and `done ID` once that
is durable; kill it at any moment and run it again: every job it said was enqueued is
done or pending again.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import sys
import tempfile
import uuid

import walasync

Event = tuple[str, str, str]  # ("enqueue", job id, payload) or ("done", job id, "")


def apply_event(pending: dict[str, str], event: Event) -> dict[str, str]:
    kind, job, payload = event
    if kind == "enqueue":
        pending[job] = payload
    elif kind == "done":
        pending.pop(job, None)  # acknowledging twice (after a redelivery) is harmless
    else:
        raise ValueError(f"unknown event {kind!r}")
    return pending


class JobQueue:
    """Jobs in, jobs out, durably."""

    def __init__(self, state: walasync.StateLog[dict[str, str], Event]) -> None:
        self._state = state
        self._taken: set[str] = set()  # handed to a worker, not acknowledged yet
        self._more = asyncio.Event()  # set when a job may be waiting

    @classmethod
    async def open(cls, path: str, checkpoint_records: int = 100) -> JobQueue:
        state = await walasync.StateLog.open(
            path,
            initial=dict,
            apply=apply_event,
            serializer=pickle,
            checkpoint_records=checkpoint_records,
        )
        return cls(state)

    @property
    def pending(self) -> dict[str, str]:
        """Jobs not yet done (taken or not), oldest first: job id -> payload."""
        return dict(self._state.state)

    async def enqueue(self, payload: str) -> str:
        """Add a job; returns its id once it is durable."""
        job = uuid.uuid4().hex
        await self._state.apply(("enqueue", job, payload))
        self._more.set()
        return job

    def try_take(self) -> tuple[str, str] | None:
        """The oldest job nobody works on (now marked taken), or None."""
        for job, payload in self._state.state.items():
            if job not in self._taken:
                self._taken.add(job)
                return job, payload
        return None

    async def take(self) -> tuple[str, str]:
        """Wait for a job nobody works on and take it."""
        while (taken := self.try_take()) is None:
            self._more.clear()
            await self._more.wait()
        return taken

    async def ack(self, job: str) -> None:
        """The job is done: durably, so it is never handed out again. Checkpoints when due."""
        await self._state.apply(("done", job, ""))
        self._taken.discard(job)
        if self._state.should_checkpoint:
            await self._state.checkpoint()

    async def checkpoint(self) -> int:
        return await self._state.checkpoint()

    async def close(self) -> None:
        await self._state.close()


async def demo(path: str) -> None:
    queue = await JobQueue.open(path)
    try:
        print(f"recovered {len(queue.pending)} pending jobs")
        for i in range(20):
            await queue.enqueue(f"resize image {i}")
        done: list[str] = []

        async def worker() -> None:
            while (taken := queue.try_take()) is not None:
                job, payload = taken
                await asyncio.sleep(0)  # the work
                await queue.ack(job)
                done.append(payload)

        await asyncio.gather(*(worker() for _ in range(3)))
        covered = await queue.checkpoint()
        print(f"3 workers did {len(done)} jobs; {len(queue.pending)} pending")
        print(f"checkpoint at LSN {covered}: the snapshot holds the pending jobs, and the")
        print("log no longer holds the records of the jobs that were done")
    finally:
        await queue.close()


async def forever(path: str) -> None:
    queue = await JobQueue.open(path)
    print(f"recovered {len(queue.pending)}", flush=True)

    async def producer(n: int) -> None:
        for i in itertools.count():
            payload = f"job-{os.getpid()}.{n}.{i}"
            print(f"enqueue? {payload}", flush=True)
            print(f"enqueued {await queue.enqueue(payload)} {payload}", flush=True)

    async def worker() -> None:
        while True:
            job, _ = await queue.take()
            await asyncio.sleep(0)  # the work
            print(f"ack? {job}", flush=True)
            await queue.ack(job)
            print(f"done {job}", flush=True)

    await asyncio.gather(*(producer(n) for n in range(4)), *(worker() for _ in range(3)))


async def main(path: str, *args: str) -> None:
    await (forever(path) if "--forever" in args else demo(path))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        asyncio.run(main(*sys.argv[1:]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(f"{tmp}/jobs"))

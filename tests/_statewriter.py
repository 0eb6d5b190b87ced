"""SIGKILL torture of a StateLog: a process applies events and checkpoints until killed.

Usage: python tests/_statewriter.py DIR RUN [--loop asyncio|uvloop]

The state is the list of event ids applied, in order (so the state says which event holds
which LSN). 16 coroutines apply events "RUN.WRITER.SEQ" (with 0-300 bytes of padding, so
the 64 KiB segments rotate) one after another; another checkpoints whenever
`should_checkpoint` says so (every 200 events); another undoes the last event every 10-50
ms. Protocol on stdout, one line per event, each written whole:

    open LAST_LSN    once, after the StateLog is open
    + NAME           before `apply` of event NAME
    a LSN NAME       once that `apply` returned LSN
    c? LSN           before a checkpoint (LSN: the last applied event then)
    c LSN            once it returned
    u?               before an undo
    u NAME           once it returned: event NAME is gone (its LSN goes to a later event)
    u-               it raised NothingToUndoError (no event after the snapshot)

`run_and_kill` (for the tests) starts it, SIGKILLs it at a moment its plan picks (after
some acknowledgements, at once when a checkpoint or an undo begins, or after a delay), and
returns what the pipe said: the acknowledgements that stand (an event undone after its
acknowledgement is dropped from them) and the events undone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import walasync

ROOT = Path(walasync.__file__).resolve().parent.parent
WRITERS = 16


def ids(state: list[str], event: dict[str, Any]) -> list[str]:
    state.append(event["id"])
    return state


def open_state(path: str | os.PathLike[str]) -> walasync.Opener[walasync.StateLog[list[str], Any]]:
    return walasync.StateLog.open(
        path,
        initial=list,
        apply=ids,
        checkpoint_records=200,
        options=walasync.Options(segment_size=64 * 1024),
    )


def _emit(text: str) -> None:
    sys.stdout.write(text)  # line-buffered: one write() per line


async def _applier(s: walasync.StateLog[list[str], Any], run: int, writer: int) -> None:
    rng = random.Random(f"{run}/{writer}")
    for seq in range(10**9):
        name = f"{run}.{writer}.{seq}"
        _emit(f"+ {name}\n")
        lsn = await s.apply({"id": name, "pad": "x" * rng.randrange(300)})
        _emit(f"a {lsn} {name}\n")


async def _checkpointer(s: walasync.StateLog[list[str], Any]) -> None:
    while True:
        await asyncio.sleep(0.001)
        if s.should_checkpoint:
            _emit(f"c? {s.last_lsn}\n")
            _emit(f"c {await s.checkpoint()}\n")


async def _undoer(s: walasync.StateLog[list[str], Any], run: int) -> None:
    rng = random.Random(f"{run}/undo")
    while True:
        await asyncio.sleep(rng.uniform(0.01, 0.05))
        _emit("u?\n")
        try:
            event = await s.undo()
        except walasync.NothingToUndoError:
            _emit("u-\n")
        else:
            _emit(f"u {event['id']}\n")


async def _main(path: str, run: int) -> None:
    s = await open_state(path)
    _emit(f"open {s.last_lsn}\n")
    await asyncio.gather(
        *(_applier(s, run, w) for w in range(WRITERS)), _checkpointer(s), _undoer(s, run)
    )


@dataclass
class Output:
    plan: tuple[str, float]
    acks: dict[int, str] = field(default_factory=dict)  # LSN: event, undone ones left out
    announced: set[str] = field(default_factory=set)
    undone: set[str] = field(default_factory=set)  # events an undo returned
    checkpoints: int = 0
    undos: int = 0  # undos begun
    undoing: bool = False  # an undo had begun, and not returned, when the pipe closed


PLANS = ("acks", "checkpoint", "undo", "delay")


def run_and_kill(
    path: Path, run: int, loop: str, rng: random.Random, kind: str | None = None
) -> Output:
    """Run the writer of `run` on `path`, SIGKILL it as a random plan (of `kind`, if given)
    says, parse its output."""
    plans = {
        "acks": ("acks", rng.randint(1, 1500)),
        "checkpoint": ("checkpoint", rng.randint(1, 4)),
        "undo": ("undo", rng.randint(2, 4)),
        "delay": ("delay", rng.uniform(0.2, 1.5)),
    }
    plan = plans[kind or rng.choice(PLANS)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = Output(plan)
    with subprocess.Popen(
        [sys.executable, __file__, str(path), str(run), "--loop", loop],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        killer = threading.Timer(plan[1] if plan[0] == "delay" else 60.0, proc.kill)
        killer.start()
        try:
            assert proc.stdout is not None and proc.stderr is not None
            count = 0
            for line in proc.stdout:
                if not line.endswith(b"\n"):
                    break
                kind, *rest = line.decode().split()
                if kind == "+":
                    out.announced.add(rest[0])
                elif kind == "a":
                    if rest[1] not in out.undone:
                        out.acks[int(rest[0])] = rest[1]
                    count += plan[0] == "acks"
                elif kind == "c?":
                    count += plan[0] == "checkpoint"
                elif kind == "c":
                    out.checkpoints += 1
                elif kind == "u?":
                    out.undos += 1
                    out.undoing = True
                    count += plan[0] == "undo"
                elif kind == "u":
                    out.undone.add(rest[0])
                    out.acks = {n: e for n, e in out.acks.items() if e != rest[0]}
                    out.undoing = False
                elif kind == "u-":
                    out.undoing = False
                if plan[0] != "delay" and count >= plan[1] and proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
            stderr = proc.stderr.read().decode()
        finally:
            killer.cancel()
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"writer exited {proc.returncode}: {stderr}"
    assert not stderr, stderr
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("dir")
    parser.add_argument("run", type=int)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(_main(args.dir, args.run))
    else:
        asyncio.run(_main(args.dir, args.run))


if __name__ == "__main__":
    main()

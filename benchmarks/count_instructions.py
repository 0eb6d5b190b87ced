"""Instructions per append, counted by valgrind: a measure a busy machine does not disturb.

Runs N coroutines appending 100-byte records to walasync (uvloop) on an I/O layer whose
durable writes are no-ops (the loop's and the interpreter's work only, as loop_ceiling.py),
under ``valgrind --tool=callgrind``, which counts every instruction the process executes.
Each source tree runs twice, with a short and a long workload; the difference between the
two counts, divided by the appends between them, is the instructions one append costs, the
interpreter's start and walasync's open and close cancelling out. With ``--baseline DIR``
it does the same for the walasync of source tree DIR (a checkout of an earlier commit:
``git worktree add DIR main``) and prints the ratio. Valgrind runs the threads one at a
time, so batches form as they do when the loop is the bottleneck. About 4 minutes::

    python benchmarks/count_instructions.py --baseline ../base [--repeats 2] [--concurrency 256]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHORT, LONG = 40, 240  # appends per coroutine: the difference of the two runs is counted


def child(tree: str, n: int, per: int) -> None:
    """Run the workload with the walasync of `tree` (in this process, under valgrind)."""
    sys.path.insert(0, tree)
    import uvloop

    import walasync

    if not Path(walasync.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"imported {walasync.__file__}, not the walasync of {tree}")

    class NoWrites(walasync.FileIO):
        def write_durable(self, fd: int, buffers: Sequence[bytes], offset: int) -> None:
            pass

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            async with walasync.open(tmp, io=NoWrites()) as wal:
                record = b"x" * 100

                async def appender() -> None:
                    for _ in range(per):
                        await wal.append(record)

                await asyncio.gather(*(appender() for _ in range(n)))

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def count(tree: str, n: int, per: int) -> int:
    """Instructions of one run of the workload, as callgrind counts them."""
    cmd = [
        *("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
        *(sys.executable, __file__, "--child", tree, str(n), str(per)),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    found = re.search(r"Collected : (\d+)", out)
    if found is None:
        raise SystemExit(f"no instruction count from valgrind:\n{out}")
    return int(found.group(1))


def per_append(tree: str, n: int, repeats: int) -> list[float]:
    """Marginal instructions per append, once per repetition."""
    out = []
    for _ in range(repeats):
        short, long = count(tree, n, SHORT), count(tree, n, LONG)
        out.append((long - short) / (n * (LONG - SHORT)))
        print(f"  {tree}: {out[-1]:,.0f} instructions/append", flush=True)
    return out


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="DIR", help="compare with walasync from DIR")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    this = statistics.median(per_append(str(ROOT), args.concurrency, args.repeats))
    print(f"this: {this:,.0f} instructions per append (N={args.concurrency})")
    if args.baseline is not None:
        base = statistics.median(per_append(args.baseline, args.concurrency, args.repeats))
        print(f"baseline: {base:,.0f} instructions per append; this/baseline {this / base:.3f}")


if __name__ == "__main__":
    main()

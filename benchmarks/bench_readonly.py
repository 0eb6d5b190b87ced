"""What a read-only reader's look at META after each chunk costs: one whole read of a log
with `async for`, through `walasync.open(path, readonly=True)` (`ro`) and through a `Wal`
(`wal`, which reads no META) for comparison.

Each read runs in a fresh process (the log is in the page cache after the first), the
code trees given with ``--tree`` side by side (say, a checkout before a change and this
one), runs interleaved, the median of ``--repeat`` reported. The log is written once, of
records of ``--record`` bytes in 1 MiB `append_many` units.

Usage::

    python benchmarks/bench_readonly.py                        # 1 GB of 1 KiB records
    python benchmarks/bench_readonly.py --tree ../before --tree . --size 1G --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_tools import grow, parse_size  # noqa: E402

READ = """
import asyncio, sys, time, walasync
async def main(path, mode):
    opened = walasync.open(path, readonly=True) if mode == "ro" else walasync.open(path)
    async with opened as log:
        start = time.perf_counter()
        n = 0
        async for _ in log.read():
            n += 1
        print(time.perf_counter() - start, n)
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def read_once(tree: Path, log: Path, mode: str) -> tuple[float, int]:
    """(seconds, records) of one whole read of `log` with the walasync of `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", READ, str(log), mode],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size", default="1G", help="log size, e.g. 100M, 1G")
    p.add_argument("--record", type=int, default=1024, help="record size in bytes")
    p.add_argument("--repeat", type=int, default=3, help="runs of each read (median)")
    p.add_argument("--tree", action="append", help="a checkout to read with (default: this)")
    p.add_argument("--modes", default="ro,wal", help="ro (read-only opening), wal")
    p.add_argument("--dir", default=".bench-tmp", help="parent dir for the log (real disk)")
    args = p.parse_args()
    trees = [Path(t).resolve() for t in args.tree or [str(HERE.parent)]]
    size = parse_size(args.size)
    os.makedirs(args.dir, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="readonly-", dir=args.dir))
    log = tmp / "log"
    try:
        last = asyncio.run(grow(log, size, args.record))
        modes = args.modes.split(",")
        times: dict[tuple[Path, str], list[float]] = {(t, m): [] for t in trees for m in modes}
        read_once(trees[0], log, modes[0])  # warm the page cache
        for _ in range(args.repeat):
            for key in times:
                seconds, n = read_once(*key[:1], log, key[1])
                assert n == last, (n, last)
                times[key].append(seconds)
        print(f"{args.size} log, {last:,} records of {args.record} bytes")
        print("| tree | read | seconds (median) | runs | MB/s | records/s |")
        print("| --- | --- | ---: | --- | ---: | ---: |")
        for (tree, mode), runs in times.items():
            med = statistics.median(runs)
            shown = " ".join(f"{s:.2f}" for s in runs)
            print(
                f"| {tree.name} | {mode} | {med:.2f} | {shown} | {size / med / 1e6:,.0f} "
                f"| {last / med:,.0f} |"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

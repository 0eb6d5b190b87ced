"""The operator's command on large logs: `walasync dump` streams in bounded memory, and how
fast `dump` and `verify` go.

One log grows through the sizes asked for (records of ``--record`` bytes, appended as 1 MiB
units); at each size, each command runs in its own process with its output thrown away,
and its peak RSS (``wait4``'s ``ru_maxrss``) and wall time are taken. ``walasync info``, which
holds no record, gives the baseline RSS of the interpreter and the imports.

Usage::

    python benchmarks/bench_tools.py                       # 100 MB and 500 MB
    python benchmarks/bench_tools.py --sizes 100M,1G,10G --dir /path/on/the/disk
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import walasync

UNIT_BYTES = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].isalpha() else int(text)


async def grow(path: Path, target: int, record: int) -> int:
    """Append 1 MiB units until the log holds `target` bytes of records; return its last LSN."""
    unit = [bytes([65 + i % 26]) * record for i in range(max(UNIT_BYTES // record, 1))]
    async with walasync.open(path) as wal:
        held = wal.last_lsn * record
        while held < target:
            await wal.append_many(unit)
            held += len(unit) * record
        return wal.last_lsn


def run(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of `python -m walasync ARGS`, output discarded."""
    start = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen([sys.executable, "-m", "walasync", *args], stdout=devnull)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"walasync {' '.join(args)} exited with {proc.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", default="100M,500M", help="log sizes, e.g. 100M,1G,10G")
    p.add_argument("--record", type=int, default=1024, help="record size in bytes")
    p.add_argument("--formats", default="raw,jsonl,hex", help="dump formats to run")
    p.add_argument("--dir", default=".bench-tmp", help="parent dir for the log (real disk)")
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tools-", dir=args.dir))
    log = tmp / "log"
    print("| log size | records | command | seconds | MB/s | peak RSS MiB | over info |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    try:
        for text in args.sizes.split(","):
            size = parse_size(text)
            last = asyncio.run(grow(log, size, args.record))
            _, base = run(["info", str(log)])
            rows = [["verify", str(log)]]
            rows += [["dump", str(log), "--format", form] for form in args.formats.split(",")]
            for command in rows:
                seconds, rss = run(command)
                name = " ".join(command[:1] + command[2:])
                print(
                    f"| {text} | {last:,} | {name} | {seconds:.1f} | {size / seconds / 1e6:,.0f} "
                    f"| {rss:.0f} | {rss - base:+.0f} |",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

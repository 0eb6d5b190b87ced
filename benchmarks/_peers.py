"""Optional peers, each imported lazily: sqlite3 (stdlib), RocksDB (rocksdict or aimrocks) and
LMDB. All run ``spec.threads`` threads, each committing one op durably at a time.

* ``sqlite3``: WAL journal, ``synchronous=FULL``, one connection per thread, autocommit INSERT
  per record (``BEGIN IMMEDIATE`` ... ``COMMIT`` around an op of several records),
  ``busy_timeout`` 60 s.
* ``rocksdb``: ``put`` with a synced WriteOptions (a WriteBatch per op of several records);
  RocksDB's own group commit shares one WAL fdatasync between concurrent writers, provided
  the binding releases the GIL, which `choose_rocksdb` checks.
* ``lmdb``: ``sync=True``, one write transaction per op (LMDB serialises writers).
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any, Protocol

from _common import Rep, Skip, Spec, Window, run_threads

ROCKSDB_BINDINGS = ("rocksdict", "aimrocks")  # tried in this order
LMDB_MAP_SIZE = 1 << 36  # address space only: the file grows as pages are used
_KEY = struct.Struct(">IQ")  # (thread, counter): unique and ascending per thread
_INTERVAL_WAL = re.compile(r"Interval WAL: .*?([\d.]+) writes per sync")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------- sqlite3


def run_sqlite(spec: Spec) -> Rep:
    """Threads with their own connections, one durable commit per op."""
    os.makedirs(spec.path)
    db = os.path.join(spec.path, "log.db")
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
    conns: list[sqlite3.Connection] = []
    rows = [(r,) for r in spec.unit(b"s")]
    insert = "INSERT INTO log (data) VALUES (?)"

    def make_op(index: int, win: Window) -> Callable[[int], bool]:
        conn = sqlite3.connect(db, timeout=60.0, isolation_level=None, check_same_thread=False)
        conns.append(conn)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=60000")
        if spec.batch == 1:
            row = rows[0]

            def op(k: int) -> bool:
                conn.execute(insert, row)
                return True

            return op

        def op_many(k: int) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(insert, rows)
            conn.execute("COMMIT")
            return True

        return op_many

    # Writers left waiting in SQLite's busy handler (which sleeps up to 100 ms a try) would
    # take seconds to drain after the window: leave them, and their connections, to the exit.
    stragglers: list[threading.Thread] = []
    try:
        return run_threads(spec, make_op, per_sync=lambda: float(spec.batch), stragglers=stragglers)
    finally:
        if not stragglers:
            for conn in conns:
                conn.close()


# --------------------------------------------------------------------------- RocksDB


class _KV(Protocol):
    def put(self, key: bytes, value: bytes) -> None: ...
    def put_batch(self, items: list[tuple[bytes, bytes]]) -> None: ...
    def stats(self) -> str: ...
    def close(self) -> None: ...


class _RocksDict:
    """rocksdict (Rust bindings, raw byte mode)."""

    def __init__(self, path: str) -> None:
        import rocksdict

        self._mod = rocksdict
        self._db = rocksdict.Rdict(path, rocksdict.Options(raw_mode=True))
        self._wo = rocksdict.WriteOptions()
        self._wo.sync = True

    def put(self, key: bytes, value: bytes) -> None:
        self._db.put(key, value, self._wo)

    def put_batch(self, items: list[tuple[bytes, bytes]]) -> None:
        wb = self._mod.WriteBatch(raw_mode=True)
        for k, v in items:
            wb.put(k, v)
        self._db.write(wb, self._wo)

    def stats(self) -> str:
        return self._db.property_value("rocksdb.stats") or ""

    def close(self) -> None:
        self._db.close()


class _AimRocks:
    """aimrocks (Cython bindings derived from python-rocksdb; releases the GIL in put)."""

    def __init__(self, path: str) -> None:
        import aimrocks

        self._mod: Any = aimrocks
        self._db: Any = aimrocks.DB(path, aimrocks.Options(create_if_missing=True))

    def put(self, key: bytes, value: bytes) -> None:
        self._db.put(key, value, sync=True)

    def put_batch(self, items: list[tuple[bytes, bytes]]) -> None:
        wb = self._mod.WriteBatch()
        for k, v in items:
            wb.put(k, v)
        self._db.write(wb, sync=True)

    def stats(self) -> str:
        raw = self._db.get_property(b"rocksdb.stats")
        return raw.decode() if isinstance(raw, bytes) else ""

    def close(self) -> None:
        # Dropping the last reference closes it: DB.close() would leave a dangling pointer
        # that __dealloc__ deletes a second time (aimrocks 0.5.2 segfaults).
        self._db = None


def open_rocksdb(binding: str, path: str) -> _KV:
    """Open a RocksDB database at ``path`` through ``binding`` (ImportError if missing)."""
    if binding == "rocksdict":
        return _RocksDict(path)
    if binding == "aimrocks":
        return _AimRocks(path)
    raise ValueError(binding)


def _threaded_put_rate(db: _KV, threads: int, seconds: float) -> float:
    end = time.perf_counter() + seconds
    counts = [0] * threads
    value = b"g" * 100

    def worker(i: int) -> None:
        k = 0
        while time.perf_counter() < end:
            db.put(_KEY.pack(i, k), value)
            k += 1
        counts[i] = k

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / seconds


def _spin(seconds: float) -> int:
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        count += 1
    return count


def _python_share(db: _KV, seconds: float) -> float:
    """How much pure-Python work this thread gets done while another thread loops on synced
    puts, relative to alone: about 1 if put releases the GIL, about 0.5 if it holds it
    (the two threads then take turns of one switch interval)."""
    alone = _spin(seconds)
    stop = threading.Event()

    def writer() -> None:
        k = 0
        while not stop.is_set():
            db.put(_KEY.pack(0, k), b"s" * 100)
            k += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.01)
        shared = _spin(seconds)
    finally:
        stop.set()
        t.join()
    return shared / alone if alone else 0.0


def choose_rocksdb(parent: str, seconds: float = 0.2) -> tuple[str | None, list[str]]:
    """The first RocksDB binding that releases the GIL in a synced put (so RocksDB's group
    commit can work), with notes on the bindings passed over.

    Two checks: a Python thread keeps running while another puts, and 16 threads get more
    synced puts/s than 1 (the second alone is at the mercy of a noisy disk).
    """
    notes: list[str] = []
    for binding in ROCKSDB_BINDINGS:
        path = tempfile.mkdtemp(prefix=f"gil-probe-{binding}-", dir=parent)
        one = many = 0.0
        try:
            try:
                db = open_rocksdb(binding, path)
            except ImportError:
                notes.append(f"{binding} not installed")
                continue
            try:
                share = _python_share(db, seconds)
                if share >= 0.8:
                    one = _threaded_put_rate(db, 1, seconds)
                    many = _threaded_put_rate(db, 16, seconds)
            finally:
                db.close()
                del db
        except Exception as exc:  # a binding that fails to work is passed over, with why
            notes.append(f"{binding} {_version(binding)} failed: {exc!r}")
            continue
        finally:
            shutil.rmtree(path, ignore_errors=True)
        name = f"{binding} {_version(binding)}"
        probe = f"a Python thread ran at {share:.0%} of its speed alone during puts"
        if share < 0.8:
            notes.append(f"{name} holds the GIL in put ({probe}): not used")
            continue
        probe += f"; 16 threads {many:,.0f} synced puts/s vs 1 thread {one:,.0f}/s"
        if many > 1.5 * one:
            notes.append(f"rocksdb via {name} ({probe})")
            return binding, notes
        notes.append(f"{name}: synced puts do not scale with threads ({probe}): not used")
    return None, notes


def run_rocksdb(spec: Spec) -> Rep:
    """Threads doing synced puts (a synced WriteBatch per op of several records)."""
    if spec.rocksdb_binding is None:
        raise Skip("no RocksDB binding that releases the GIL")
    try:
        db = open_rocksdb(spec.rocksdb_binding, spec.path)
    except ImportError as exc:
        raise Skip(f"{spec.rocksdb_binding} not installed") from exc
    per_sync: list[float] = []

    def hook(at_start: bool) -> None:
        # rocksdb.stats' "Interval" lines cover the time since the previous call
        text = db.stats()
        if not at_start and (m := _INTERVAL_WAL.search(text)):
            per_sync.append(float(m.group(1)) * spec.batch)

    values = spec.unit(b"k")

    def make_op(index: int, win: Window) -> Callable[[int], bool]:
        if spec.batch == 1:
            value = values[0]

            def op(k: int) -> bool:
                db.put(_KEY.pack(index, k), value)
                return True

            return op

        def op_many(k: int) -> bool:
            base = k * spec.batch
            db.put_batch([(_KEY.pack(index, base + j), v) for j, v in enumerate(values)])
            return True

        return op_many

    try:
        return run_threads(
            spec, make_op, hook=hook, per_sync=lambda: per_sync[0] if per_sync else None
        )
    finally:
        db.close()


# --------------------------------------------------------------------------- LMDB


def run_lmdb(spec: Spec) -> Rep:
    """Threads each committing one synced write transaction per op."""
    try:
        import lmdb
    except ImportError as exc:
        raise Skip("lmdb not installed") from exc
    env = lmdb.open(spec.path, map_size=LMDB_MAP_SIZE, sync=True, metasync=True, lock=True)
    values = spec.unit(b"l")

    def make_op(index: int, win: Window) -> Callable[[int], bool]:
        def op(k: int) -> bool:
            base = k * spec.batch
            with env.begin(write=True) as txn:
                for j, v in enumerate(values):
                    txn.put(_KEY.pack(index, base + j), v)
            return True

        return op

    try:
        return run_threads(spec, make_op, per_sync=lambda: float(spec.batch))
    finally:
        env.close()

"""`walasync.prometheus.WalCollector`, scraped through a real prometheus_client registry."""

from __future__ import annotations

import asyncio
import errno
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import until
from iofaults import ControlledIO
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import walasync
from walasync.prometheus import SECOND_BUCKETS, WalCollector

COUNTERS = ("appends", "records", "appended_bytes", "batches", "slow_fsyncs")
GAUGES = (
    *("pending_records", "pending_bytes", "in_flight_records", "waiting_appenders"),
    *("segments", "disk_bytes", "first_lsn", "last_lsn", "synced_lsn", "broken"),
)
HISTOGRAMS = ("batch_records", "append_duration_seconds", "fsync_duration_seconds")


def scrape(registry: CollectorRegistry) -> dict[str, list[Sample]]:
    """The registry's exposition, parsed back: samples by family name."""
    text = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list[Sample], path: str, name: str | None = None, **labels: str) -> float:
    (hit,) = [
        s
        for s in samples
        if s.labels.get("path") == path
        and (name is None or s.name == name)
        and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return hit.value


async def test_a_scrape_exports_the_stats_under_conventional_names(log_dir: Path) -> None:
    registry = CollectorRegistry()
    async with walasync.open(log_dir, slow_sync_warning=None) as wal:
        collector = WalCollector(wal)
        registry.register(collector)
        for i in range(5):
            await wal.append(b"r%d" % i)
        await wal.append_many([b"a", b"b", b"c"])
        await until(lambda: wal.stats().append_seconds.count == 6, "latencies counted")
        stats = wal.stats()
        families = scrape(registry)
    path = str(log_dir)
    assert {f"walasync_{name}" for name in COUNTERS + GAUGES + HISTOGRAMS} == set(families)
    counters = families["walasync_appends"]
    assert value(counters, path, "walasync_appends_total") == 6
    assert value(families["walasync_records"], path, "walasync_records_total") == 8
    assert value(families["walasync_appended_bytes"], path, "walasync_appended_bytes_total") == 13
    assert value(families["walasync_batches"], path, "walasync_batches_total") == 6
    assert value(families["walasync_slow_fsyncs"], path, "walasync_slow_fsyncs_total") == 0
    assert value(families["walasync_last_lsn"], path) == 8 == stats.last_lsn
    assert value(families["walasync_synced_lsn"], path) == 8
    assert value(families["walasync_first_lsn"], path) == 1
    assert value(families["walasync_segments"], path) == 1
    assert value(families["walasync_disk_bytes"], path) == stats.disk_bytes
    assert value(families["walasync_broken"], path) == 0
    assert value(families["walasync_pending_records"], path) == 0

    fsync = families["walasync_fsync_duration_seconds"]
    assert value(fsync, path, "walasync_fsync_duration_seconds_count") == 6
    total = value(fsync, path, "walasync_fsync_duration_seconds_sum")
    assert total == pytest.approx(stats.sync_seconds.sum)
    buckets = [s for s in fsync if s.name.endswith("_bucket")]
    assert [float(s.labels["le"]) for s in buckets] == [*SECOND_BUCKETS, float("inf")]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts) and counts[-1] == 6
    expected = dict(stats.sync_seconds.cumulative(SECOND_BUCKETS))
    assert all(s.value == expected[float(s.labels["le"])] for s in buckets)

    sizes = families["walasync_batch_records"]
    assert value(sizes, path, "walasync_batch_records_bucket", le="1.0") == 5
    assert value(sizes, path, "walasync_batch_records_bucket", le="4.0") == 6
    assert value(sizes, path, "walasync_batch_records_sum") == 8
    latency = families["walasync_append_duration_seconds"]
    assert value(latency, path, "walasync_append_duration_seconds_count") == 6


async def test_one_collector_exports_several_logs_and_drops_closed_ones(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    collector = WalCollector()
    registry.register(collector)
    a = await walasync.open(tmp_path / "a")
    b = await walasync.open(tmp_path / "b")
    try:
        collector.add(a)
        collector.add(b)
        collector.add(a)  # once is enough
        await a.append(b"only in a")
        last = scrape(registry)["walasync_last_lsn"]
        assert {s.labels["path"]: s.value for s in last} == {
            str(tmp_path / "a"): 1,
            str(tmp_path / "b"): 0,
        }
        collector.remove(b)
        collector.remove(b)  # not there: nothing happens
        assert [s.labels["path"] for s in scrape(registry)["walasync_last_lsn"]] == [
            str(tmp_path / "a")
        ]
        collector.add(b)
        await a.close()
        assert [s.labels["path"] for s in scrape(registry)["walasync_last_lsn"]] == [
            str(tmp_path / "b")
        ]
    finally:
        await a.close()
        await b.close()
    assert scrape(registry)["walasync_last_lsn"] == []


async def test_a_broken_log_exports_broken(log_dir: Path) -> None:
    io = ControlledIO()
    registry = CollectorRegistry()
    async with walasync.open(log_dir, io=io) as wal:
        registry.register(WalCollector(wal))
        io.fail_fdatasync = errno.EIO
        with pytest.raises(walasync.BrokenLogError):
            await wal.append(b"x")
        assert value(scrape(registry)["walasync_broken"], str(log_dir)) == 1


async def test_a_scrape_from_the_exporter_s_thread(log_dir: Path) -> None:
    """prometheus_client's HTTP server scrapes on its own thread."""
    registry = CollectorRegistry()
    async with walasync.open(log_dir) as wal:
        registry.register(WalCollector(wal))
        await wal.append(b"x")
        text = (await asyncio.to_thread(generate_latest, registry)).decode()
    assert f'walasync_last_lsn{{path="{log_dir}"}} 1.0' in text


def test_importing_walasync_does_not_import_prometheus_client() -> None:
    code = "import sys, walasync; sys.exit('prometheus_client' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

"""Shared fixtures: every async test runs on the default loop and on uvloop, with a guard
that fails any blocking system call walasync makes on the event loop thread."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from blockbuster import BlockBuster, BlockBusterFunction
from hypothesis import settings

# The suite draws the same hypothesis examples on every run (a failure in CI can be run
# again as it was); `pytest --hypothesis-profile=explore` draws new ones, to look further.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("repeatable")

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra on every POSIX system
    uvloop = None  # type: ignore[assignment]

T = TypeVar("T")

# The event loops every test runs on: async tests get them from the hook below; sync tests
# that drive a loop themselves (hypothesis, crash enumeration) use `loops` and `run`.
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
if uvloop is not None:
    LOOPS["uvloop"] = uvloop.new_event_loop
loops = pytest.mark.parametrize("loop", list(LOOPS))


def run(loop: str, main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on a new event loop of the named kind (asyncio.Runner, but for 3.10)."""
    ev = LOOPS[loop]()
    try:
        return ev.run_until_complete(main)
    finally:
        try:
            ev.run_until_complete(ev.shutdown_asyncgens())
            ev.run_until_complete(ev.shutdown_default_executor())
        finally:
            ev.close()


@contextlib.asynccontextmanager
async def cancel_after(delay: float) -> AsyncIterator[None]:
    """Cancel the body after `delay` seconds and raise TimeoutError, as `asyncio.timeout`
    (3.11+) does; the body is cancelled at the same await it would be there.

    For bodies nothing else cancels (3.10 has no `Task.uncancel` to tell the two apart).
    """
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    handle = asyncio.get_running_loop().call_later(delay, expire)
    try:
        yield
    except asyncio.CancelledError:
        if expired:
            raise TimeoutError from None
        raise
    finally:
        handle.cancel()


async def until(condition: Callable[[], object], what: str = "", timeout: float = 30) -> None:
    """Wait until `condition()` is true, checking every millisecond.

    For a test that needs the loop to reach a state (appends queued, a batch taken) before
    it goes on: a fixed sleep counts time, and on a loaded machine the sleep can end before
    the loop has run the callbacks that make the state. `timeout` only turns a hang into a
    failure; it is not a claim about speed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"still waiting after {timeout} s for {what or condition}")
        await asyncio.sleep(0.001)


# System calls walasync makes that blockbuster does not watch by default.
_WATCHED = (
    "os.open",
    "os.close",
    "os.pread",
    "os.pwrite",
    "os.pwritev",
    "os.fdatasync",
    "os.fsync",
    "os.ftruncate",
    "os.fstat",
    "os.listdir",
    "os.makedirs",
    "fcntl.flock",
)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return LOOPS


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Time out uvloop tests with pytest-timeout's thread method.

    Its default (signal) method raises from a SIGALRM handler, which a uvloop loop blocked
    in libuv never runs: a hung uvloop test would hang the whole run. The thread method
    dumps every thread's stack and ends the run instead. Each test keeps its own timeout.
    """
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "uvloop" not in callspec.id.split("-"):
            continue
        marker = item.get_closest_marker("timeout")
        seconds = None
        if marker is not None:
            seconds = marker.kwargs.get("timeout", marker.args[0] if marker.args else None)
        item.add_marker(pytest.mark.timeout(timeout=seconds, method="thread"), append=False)


def blocking_guard() -> BlockBuster:
    """A BlockBuster that raises BlockingError when code in the walasync package makes a
    blocking call on a thread that runs an event loop."""
    guard = BlockBuster(scanned_modules=["walasync"])
    for name in _WATCHED:
        guard.functions[name] = BlockBusterFunction(None, name, scanned_modules=["walasync"])
    return guard


@pytest.fixture(autouse=True)
def no_blocking_calls_on_the_loop() -> Iterator[BlockBuster]:
    guard = blocking_guard()
    guard.activate()
    try:
        yield guard
    finally:
        guard.deactivate()


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """A path for a log directory that does not exist yet."""
    return tmp_path / "log"


def segment_files(path: Path) -> list[Path]:
    """The segment files of a log directory, oldest first."""
    return sorted(path.glob("*.wal"))


def small(**options: Any) -> dict[str, Any]:
    """Options for tests that want many segments from few records."""
    return {"segment_size": 4096, **options}

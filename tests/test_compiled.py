"""The compiled build (mypyc) and the pure one: CI runs the suite on each and says which.

With `WALASYNC_EXPECT_COMPILED=1` (or `0`) in the environment, the append path must be
compiled (or pure): a CI step that compiled nothing, or whose extension modules Python did
not pick up, fails here instead of testing the pure build twice.
"""

from __future__ import annotations

import importlib
import os
import re
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import walasync

ROOT = Path(__file__).resolve().parent.parent


def compiled_modules() -> list[str]:
    """The modules the mypyc build hook of pyproject.toml compiles, as import names."""
    text = (ROOT / "pyproject.toml").read_text()
    hook = text.split("[tool.hatch.build.targets.wheel.hooks.mypyc]", 1)[1].split("\n[", 1)[0]
    files = re.findall(r'"(walasync/[^"]+\.py)"', hook)
    return [f[: -len(".py")].replace("/", ".") for f in files]


def is_extension(module: str) -> bool:
    return str(importlib.import_module(module).__file__).endswith(tuple(EXTENSION_SUFFIXES))


def test_the_hook_names_the_append_path() -> None:
    modules = compiled_modules()
    assert "walasync._batcher" in modules and "walasync._wal" in modules
    for name in modules:
        assert (ROOT / (name.replace(".", "/") + ".py")).is_file(), name
    # The public opener stays interpreted: it checks the options' types itself.
    assert "walasync._open" not in modules


def test_compiled_says_what_runs() -> None:
    assert walasync.COMPILED == is_extension("walasync._batcher")
    # One build or the other, never a mix (a stale .so beside an edited .py).
    assert {is_extension(m) for m in compiled_modules()} == {walasync.COMPILED}


@pytest.mark.skipif(
    os.environ.get("WALASYNC_EXPECT_COMPILED") not in ("0", "1"),
    reason="WALASYNC_EXPECT_COMPILED is not set (CI sets it)",
)
def test_the_build_ci_asked_for() -> None:
    assert walasync.COMPILED == (os.environ["WALASYNC_EXPECT_COMPILED"] == "1")

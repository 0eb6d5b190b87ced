"""The public face: `__all__` matches what the package exports, under public names."""

from __future__ import annotations

import importlib.resources
import inspect

import walasync
from walasync import errors


def test_all_lists_exactly_the_public_names() -> None:
    public = {n for n in dir(walasync) if not n.startswith("_")}
    modules = {n for n in public if inspect.ismodule(getattr(walasync, n))}
    assert set(walasync.__all__) == public - modules
    # Sorted as ruff's RUF022 sorts it: constants, then the rest in case-sensitive order.
    assert list(walasync.__all__) == sorted(walasync.__all__, key=lambda n: (not n.isupper(), n))


def test_public_names_report_the_public_module() -> None:
    for name in walasync.__all__:
        obj = getattr(walasync, name)
        if inspect.isclass(obj):
            assert obj.__module__ == "walasync", name


def test_errors_form_one_family() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), walasync.WalError)
    assert issubclass(walasync.UnsupportedFormatError, walasync.CorruptionError)
    err = walasync.CorruptionError("/x/1.wal", 40, "bad")
    assert (err.path, err.offset) == ("/x/1.wal", 40) and "offset 40" in str(err)


def test_package_is_typed() -> None:
    assert importlib.resources.files("walasync").joinpath("py.typed").is_file()

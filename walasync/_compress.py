"""zstd compression of batch payloads: the optional `walasync[zstd]` extra.

The unit of compression is a batch's payload (its length table and records): one group
commit, so records that look alike (JSON events, say) compress together without a shared
dictionary. Pure functions and small objects, no I/O; `zstandard` is imported only when
compression is asked for or a compressed batch is read, never by `import walasync`.

Decompression is bounded before any memory is taken: a frame must declare its content
size (our writer always does), and a size beyond what the batch's record count allows, or
beyond `MAX_EXPANDED`, is refused, as is a frame that decodes to another size or carries
bytes after it. zstandard releases the GIL while it works, so compressing on the I/O thread
and decompressing in the reader's executor leave the event loop free.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = (
    "EXTRA_HINT",
    "MAX_EXPANDED",
    "MIN_INPUT",
    "Compressor",
    "ExpandError",
    "check",
    "decompress",
    "require",
)

# A compressed batch never expands past this: batches larger than it are written plain, so
# a reader never allocates more than this for one batch, whatever the bytes claim.
MAX_EXPANDED = 64 << 20
# Payloads shorter than this are written plain: a zstd frame's own header and block
# header (about 12 bytes) eat what a few dozen bytes could save.
MIN_INPUT = 64
EXTRA_HINT = "the zstandard package: pip install 'walasync[zstd]'"
_local = threading.local()  # a decompression context per thread (they are not shareable)


class ExpandError(Exception):
    """A compressed payload that may not or cannot be expanded (mapped by the caller)."""


def require() -> Any:
    """The `zstandard` module.

    Raises:
        ImportError: it is not installed (the message names the extra).
    """
    try:
        import zstandard
    except ImportError as exc:
        raise ImportError(f"compression='zstd' needs {EXTRA_HINT}") from exc
    return zstandard


def check(compression: str | None, level: int) -> None:
    """Validate the compression options.

    Raises:
        ValueError: an unknown compression, or a level zstd does not have.
        ImportError: compression is on and zstandard is not installed.
    """
    if compression is None:
        return
    if compression != "zstd":
        raise ValueError(f"compression must be 'zstd' or None, not {compression!r}")
    zstd = require()
    low, high = -(1 << 17), zstd.MAX_COMPRESSION_LEVEL
    if not isinstance(level, int) or isinstance(level, bool) or not low <= level <= high:
        raise ValueError(f"compression_level must be an int from {low} to {high}, not {level!r}")


class Compressor:
    """Compresses batch payloads at one level; use from one thread at a time (the I/O
    thread's)."""

    def __init__(self, level: int) -> None:
        check("zstd", level)
        zstd = require()
        self.level = level
        self._cctx = zstd.ZstdCompressor(
            level=level, write_checksum=False, write_content_size=True, write_dict_id=False
        )

    def __call__(self, plain: bytes) -> bytes | None:
        """The zstd frame of `plain`, or None when it would not be shorter (incompressible
        data, or too little of it) or `plain` is over `MAX_EXPANDED`."""
        if not MIN_INPUT <= len(plain) <= MAX_EXPANDED:
            return None
        frame: bytes = self._cctx.compress(plain)
        return frame if len(frame) < len(plain) else None


def decompress(frame: bytes | memoryview, minimum: int, limit: int) -> bytes:
    """Expand one zstd frame to between `minimum` and `limit` bytes (both inclusive).

    Raises:
        ExpandError: the frame is damaged, declares no size or one outside the bounds,
            decodes to another size, or has bytes after it.
        ImportError: zstandard is not installed.
    """
    zstd = require()
    try:
        size = zstd.frame_content_size(frame)
    except zstd.ZstdError as exc:
        raise ExpandError(f"not a zstd frame ({exc})") from None
    if size < 0:
        raise ExpandError("the zstd frame does not declare its size")
    if not minimum <= size <= min(limit, MAX_EXPANDED):
        raise ExpandError(
            f"the zstd frame expands to {size} bytes, outside the {minimum} to "
            f"{min(limit, MAX_EXPANDED)} its record count and max_record_size allow"
        )
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstd.ZstdDecompressor()
    try:
        plain: bytes = dctx.decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstd.ZstdError as exc:
        raise ExpandError(f"damaged zstd frame ({exc})") from None
    if len(plain) != size:
        raise ExpandError(f"the zstd frame declares {size} bytes but holds {len(plain)}")
    return plain

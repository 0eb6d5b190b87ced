"""How `walasync dump` writes records: one record at a time, so memory stays bounded.

Formats: "raw" (the records' bytes back to back, nothing else: for logs of self-delimiting
records), "hex" (a header line per record, then `hexdump -C` style lines), "jsonl" (one
JSON object per line) and "json" (one JSON array, written as it goes). In JSON a record is
`{"lsn": N, "size": N, "data": "..."}` when its bytes are UTF-8 text, and
`{"lsn": N, "size": N, "base64": "..."}` otherwise.
"""

from __future__ import annotations

import base64
import json
from typing import BinaryIO

__all__ = ("FORMATS", "Dumper")

FORMATS = ("jsonl", "json", "hex", "raw")
_PRINTABLE = bytes(c if 32 <= c < 127 else ord(".") for c in range(256))


def _as_json(lsn: int, data: bytes) -> bytes:
    record: dict[str, object] = {"lsn": lsn, "size": len(data)}
    try:
        record["data"] = data.decode()
    except UnicodeDecodeError:
        record["base64"] = base64.b64encode(data).decode()
    return json.dumps(record, ensure_ascii=False).encode()


def _as_hex(lsn: int, data: bytes) -> bytes:
    digits = data.hex(" ")  # once per record, then sliced: 3 characters a byte
    text = data.translate(_PRINTABLE).decode("ascii")
    lines = [f"LSN {lsn}: {len(data)} bytes"]
    for pos in range(0, len(data), 16):
        left, right = digits[3 * pos : 3 * pos + 23], digits[3 * pos + 24 : 3 * pos + 47]
        lines.append(f"  {pos:08x}  {left:<23}  {right:<23}  |{text[pos : pos + 16]}|")
    return ("\n".join(lines) + "\n").encode()


class Dumper:
    """Writes records to `out` in one of `FORMATS`: `record()` for each, then `end()`."""

    def __init__(self, out: BinaryIO, form: str) -> None:
        if form not in FORMATS:
            raise ValueError(f"unknown format {form!r}; one of {', '.join(FORMATS)}")
        self.out = out
        self.form = form
        self.count = 0

    def record(self, lsn: int, data: bytes) -> None:
        form, out = self.form, self.out
        if form == "raw":
            out.write(data)
        elif form == "jsonl":
            out.write(_as_json(lsn, data) + b"\n")
        elif form == "json":
            out.write((b",\n" if self.count else b"[\n") + _as_json(lsn, data))
        else:
            out.write(_as_hex(lsn, data))
        self.count += 1

    def end(self) -> None:
        """Close what the format opened (the JSON array) and flush."""
        if self.form == "json":
            self.out.write(b"\n]\n" if self.count else b"[]\n")
        self.out.flush()

"""One ``Range: bytes=…`` over a chunk, answered the same way by the origin and by peers:
200 with the whole chunk, 206 with the part asked for, 416 (with ``Content-Range``) else."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

_RANGE = re.compile(r"\s*bytes=(\d*)-(\d*)\s*")


class RangeNotSatisfiable(ValueError):
    def __init__(self, why: str, length: int) -> None:
        super().__init__(why)
        self.headers = {"Content-Range": f"bytes */{length}"}


@dataclass(frozen=True)
class Span:
    status: int  # 200: the whole chunk, 206: a part
    start: int
    end: int  # exclusive
    headers: dict[str, str] = field(default_factory=dict)  # Content-Length, and Content-Range for 206


def byte_range(header: Optional[str], length: int) -> Span:
    """The bytes to send for ``header`` (None: the whole chunk); RangeNotSatisfiable for 416."""
    if not header:
        return Span(200, 0, length, {"Content-Length": str(length)})
    m = _RANGE.fullmatch(header)
    if not m or (not m.group(1) and not m.group(2)):
        raise RangeNotSatisfiable(f"unsupported Range {header!r}: give one range, bytes=START-END", length)
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)) + 1, length) if m.group(2) else length
    else:
        start, end = max(0, length - int(m.group(2))), length
    if start >= end:
        raise RangeNotSatisfiable(f"Range {header!r} is outside the chunk's {length} bytes", length)
    return Span(206, start, end, {"Content-Length": str(end - start),
                                  "Content-Range": f"bytes {start}-{end - 1}/{length}"})

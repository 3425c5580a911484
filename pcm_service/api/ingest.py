"""Streamed submissions: ``POST /v1/pcm/workload-streams`` with an NDJSON body, a
``WorkloadHeader`` on its first line and one ``RowIn`` per line after it.

The service reads the body as it arrives and stores rows as they are read (a few thousand
per transaction), so a million-row workload never sits in memory: neither as one JSON
document nor as one pydantic model. A bad line ends the request with a 400 naming the line
and the field; what was stored of it is removed (nothing of the workload stays).
"""
from __future__ import annotations

from typing import AsyncIterator, Iterable, Iterator, Optional

import anyio.from_thread
from pydantic import ValidationError

from pcm_service.protocol import RowIn, WorkloadHeader


class IngestError(ValueError):
    """A line of a streamed submission that cannot be accepted."""

    def __init__(self, line: int, field: str, message: str) -> None:
        super().__init__(f"line {line}: {field}: {message}")
        self.line = line
        self.field = field
        self.message = message


def ndjson_lines(chunks: Iterable[bytes], max_line: int) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a byte stream split anywhere, blank lines skipped. Linear in the
    body: a line's pieces are joined once, when its newline comes (rebuilding ``tail + chunk``
    per chunk took 21 s for one 64 MB line); a line over ``max_line`` bytes is an IngestError."""
    lineno, pending = 0, 0
    pieces: list[bytes] = []
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            lineno += 1
            if pending + end - start > max_line:
                raise _too_long(lineno, max_line)
            line = b"".join([*pieces, chunk[start:end]]) if pieces else chunk[start:end]
            pieces, pending, start = [], 0, end + 1
            if line.strip():
                yield lineno, line
        if start < len(chunk):
            pieces.append(chunk[start:])
            pending += len(chunk) - start
            if pending > max_line:
                raise _too_long(lineno + 1, max_line)
    tail = b"".join(pieces)
    if tail.strip():
        yield lineno + 1, tail


def _too_long(lineno: int, max_line: int) -> IngestError:
    return IngestError(lineno, "body", f"the line is longer than {max_line} bytes: split the row or shorten"
                                       " its prompt")


def _first_problem(e: ValidationError, prefix: str) -> tuple[str, str]:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    field = f"{prefix}.{loc}" if prefix and loc else (loc or prefix or "body")
    return field, str(err.get("msg", "")).removeprefix("Value error, ")


def parse_submission(chunks: Iterable[bytes], max_line: int
                     ) -> tuple[WorkloadHeader, Iterator[RowIn]]:
    """The header (read now) and the rows (validated as they are read; the iterator raises
    IngestError at the first bad line)."""
    lines = ndjson_lines(chunks, max_line)
    first = next(lines, None)
    if first is None:
        raise IngestError(1, "body", "empty: the first line must be the workload (name, context or model,"
                                     " batch_size, output, ...), then one row per line")
    try:
        header = WorkloadHeader.model_validate_json(first[1])
    except ValidationError as e:
        raise IngestError(first[0], *_first_problem(e, "")) from None
    return header, _rows(lines)


def _rows(lines: Iterator[tuple[int, bytes]]) -> Iterator[RowIn]:
    seen: set[str] = set()
    for lineno, line in lines:
        try:
            row = RowIn.model_validate_json(line)
        except ValidationError as e:
            raise IngestError(lineno, *_first_problem(e, "row")) from None
        if row.row_id in seen:
            raise IngestError(lineno, "row.row_id", f"duplicate row id {row.row_id!r}")
        seen.add(row.row_id)
        yield row
    if not seen:
        raise IngestError(1, "rows", "no rows: give one row per line after the workload line")


def body_chunks(stream: AsyncIterator[bytes]) -> Iterator[bytes]:
    """The request body as a plain iterator, for a worker thread: each chunk is awaited on the
    event loop (anyio's from_thread), so the body is read only as fast as rows are stored."""

    async def next_chunk() -> Optional[bytes]:
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None

    while (chunk := anyio.from_thread.run(next_chunk)) is not None:
        if chunk:
            yield chunk

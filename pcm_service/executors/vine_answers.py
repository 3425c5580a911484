"""What a vine_worker sends back is data, never code (security issue 28, item 5).

ndcctools' ``task.output`` runs ``cloudpickle.loads`` on the bytes a worker wrote, so a
worker (or whoever poisoned it) could run anything in the service. The service reads the
call's raw output file instead and decodes it with an unpickler that admits no globals at
all (the Python docs' "Restricting Globals"): only the plain containers and scalars pickle
builds without a global. The library's answer inside is JSON text, validated field by
field; anything else is an untrusted answer, and its call counts as crashed.
"""
from __future__ import annotations

import io
import pickle
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pcm_service.protocol import BatchLease, RowResult

MAX_ANSWER_BYTES = 256 * 2**20  # a batch's texts; a bigger answer is refused unread
MAX_OBJECTS = 1_000_000  # containers and scalars in one decoded answer
PLAIN = (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, bool, type(None))


class UntrustedAnswer(Exception):
    """A worker's answer that is not the plain data PCM's library writes."""


class _NoGlobals(pickle.Unpickler):
    """No class, function or module is ever looked up, so no ``__reduce__`` payload can run."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} refused")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids refused")


def loads_plain(raw: bytes) -> Any:
    """Unpickle ``raw`` admitting no globals; raises UntrustedAnswer."""
    if len(raw) > MAX_ANSWER_BYTES:
        raise UntrustedAnswer(f"answer of {len(raw)} bytes is over {MAX_ANSWER_BYTES}")
    try:
        obj = _NoGlobals(io.BytesIO(raw)).load()
    except Exception as e:  # any malformed stream: refused, whatever the reason
        raise UntrustedAnswer(f"answer refused: {type(e).__name__}: {e}"[:500]) from None
    _check_plain(obj)
    return obj


def _check_plain(obj: Any) -> None:
    """Defence in depth: every object reached is exactly one of PLAIN (no subclass)."""
    stack, seen = [obj], 0
    while stack:
        x = stack.pop()
        seen += 1
        if seen > MAX_OBJECTS or type(x) not in PLAIN:
            raise UntrustedAnswer(f"answer holds {type(x).__name__}" if seen <= MAX_OBJECTS
                                  else "answer holds too many objects")
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)


class LibraryRecord(BaseModel):
    """Which library process answered (worker_image.vine_library.library_record)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    pid: Optional[int] = None
    host: Optional[str] = Field(default=None, max_length=255)
    context_id: Optional[str] = Field(default=None, max_length=64)
    loads: Optional[int] = None
    load_seconds: Optional[float] = None
    error: Optional[str] = Field(default=None, max_length=8000)
    refused: Optional[str] = Field(default=None, max_length=2000)  # the weights failed the manifest


class CallAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    library: LibraryRecord
    results: list[RowResult]


def call_answer(raw: bytes, lease: BatchLease, envelope: bool) -> CallAnswer:
    """The answer in a call's output file. ``envelope``: a FunctionCall's (the Library wraps
    the function's return value in {"Result", "Success", "Reason"}); else a PythonTask's bare
    return value. Results must be rows of ``lease``, each at most once. Raises UntrustedAnswer."""
    value = loads_plain(raw)
    if envelope:
        if not isinstance(value, dict) or value.get("Success") is not True:
            raise UntrustedAnswer("answer is not a successful library response")
        value = value.get("Result")
    if not isinstance(value, str):
        raise UntrustedAnswer(f"answer is {type(value).__name__}, not the library's JSON text")
    try:
        answer = CallAnswer.model_validate_json(value)
    except ValidationError as e:
        raise UntrustedAnswer(f"answer refused: {e.errors()[0]['msg']} at {e.errors()[0]['loc']}"[:500]) from None
    rows = {r.idx for r in lease.rows}
    idx = [r.idx for r in answer.results]
    if not set(idx) <= rows or len(idx) != len(set(idx)):
        raise UntrustedAnswer(f"answer has rows outside batch {lease.batch_id} or twice")
    return answer

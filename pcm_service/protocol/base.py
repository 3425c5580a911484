"""What every wire model shares: strict validation, bounded integers, the one error body."""
from __future__ import annotations

import enum
from typing import Annotated, Any, Optional

from annotated_types import Ge, Gt, Le
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

API_PREFIX = "/v1/pcm"  # PCM's own routes; OpenAI's (/v1/files, /v1/batches, /v1/models) sit beside them
EXECUTOR_PATH = f"{API_PREFIX}/executor"  # what a glidein runs (GET, pool token): ExecutorInfo


# integers stay within what JSON carries exactly (and SQLite stores): larger ones are refused


INT_MAX = 2**53 - 1


def integral(v: Any) -> Any:
    """JSON Schema counts 3.0 as an integer; so do we (but never 3.5, "3" or true)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, Ge(-INT_MAX), Le(INT_MAX), BeforeValidator(integral)]


Count = Annotated[int, Ge(0), Le(INT_MAX), BeforeValidator(integral)]  # ids, indexes, sizes, counts


Positive = Annotated[int, Gt(0), Le(INT_MAX), BeforeValidator(integral)]

# strings a worker sends: bounded (glidein hosts are not trusted; a 50 MB host name was stored once)
Short = Annotated[str, StringConstraints(max_length=256)]  # host names, glidein ids, GPU names
Ident = Annotated[str, StringConstraints(max_length=128, pattern=r"^[A-Za-z0-9._:@+-]*$")]  # ids and digests
Message = Annotated[str, StringConstraints(max_length=8192)]  # an error a worker reports
Chunk = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]  # a chunk's sha256
BlobURL = Annotated[str, StringConstraints(max_length=512, pattern=r"^https?://[^\s]+$")]  # a peer's blob server
# a file or directory path a user names (model, output): no NUL or other control character,
# which no file system takes (a NUL was a 500, and an output with one never completed), at most PATH_MAX
FilePath = Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00-\x1f\x7f]+$")]


class Strict(BaseModel):
    """Unknown fields and wrong types are refused: no bool or string for a number, no number
    for a string. Enum fields are marked ``strict=False`` so they take their values, as JSON
    carries them (in strict mode pydantic wants Enum instances from Python input)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ErrorCode(str, enum.Enum):
    """Machine-readable reason of an error answer (``ErrorBody.code``)."""

    INVALID_REQUEST = "invalid_request"  # 422: the request does not match the API schema
    INVALID_VALUE = "invalid_value"  # 400: it does, but breaks a rule between fields (duplicate ids, max < min)
    MODEL_UNAVAILABLE = "model_unavailable"  # 400: the model path breaks the model policy or is unreadable
    MISSING_TOKEN = "missing_token"  # 401
    WRONG_TOKEN = "wrong_token"  # 403
    NOT_FOUND = "not_found"  # 404: no such route or object
    WORKER_UNKNOWN = "worker_unknown"  # 404: no worker by that id here: register again
    WORKER_LOST = "worker_lost"  # 404: the service declared it lost (no heartbeat): register again
    WORKER_RETIRED = "worker_retired"  # 410: it left (deregistered or retired): never register again
    METHOD_NOT_ALLOWED = "method_not_allowed"  # 405 (the Allow header lists the methods)
    REQUEST_TOO_LARGE = "request_too_large"  # 413
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"  # 416
    BUSY = "busy"  # 503: every upload slot is taken; ask another source
    MODEL_NOT_FOUND = "model_not_found"  # 400/404: no model registered by that name
    NO_CHAT_TEMPLATE = "no_chat_template"  # 400: chat rows for a model without a chat template
    CONFLICT = "conflict"  # 409: not in this state (e.g. cancelling a completed batch)
    INVALID_TYPE = "invalid_type"  # 400: OpenAI's code for a value of the wrong type
    INVALID_FILE_FORMAT = "invalid_file_format"  # 400: an upload that is not JSONL
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # 415: a body in a format the route does not take
    # worker trust: a worker acts only with its own credential, on its own leases and context
    WRONG_WORKER = "wrong_worker"  # 403: not this worker's credential (another's, or the pool token)
    BATCH_NOT_LEASED = "batch_not_leased"  # 409: a report for a batch not leased to this worker
    CONTEXT_NOT_ASSIGNED = "context_not_assigned"  # 409: an engine event for a context not assigned to it
    PEER_ADDRESS = "peer_address"  # 400: a blob URL on another address than the worker's own
    TOO_MANY_WORKERS = "too_many_workers"  # 409/503: registrations over the glidein's or the service's bound
    CROSS_SITE = "cross_site_request"  # 403: the status page's login or logout posted from another site


# the code an error answer gets from its status alone, where the answer says no more
CODE_OF_STATUS = {401: ErrorCode.MISSING_TOKEN, 403: ErrorCode.WRONG_TOKEN, 404: ErrorCode.NOT_FOUND,
                  405: ErrorCode.METHOD_NOT_ALLOWED, 413: ErrorCode.REQUEST_TOO_LARGE,
                  415: ErrorCode.UNSUPPORTED_MEDIA_TYPE, 416: ErrorCode.RANGE_NOT_SATISFIABLE, 503: ErrorCode.BUSY}


class ErrorItem(Strict):
    field: str
    message: str


class ErrorBody(Strict):
    """The one shape of every error answer: a code, a message, the field at fault if any."""

    code: ErrorCode = Field(strict=False)
    detail: str
    field: Optional[str] = None
    errors: list[ErrorItem] = Field(default_factory=list)  # 422: every field at fault

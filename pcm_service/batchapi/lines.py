"""OpenAI Batch input lines → PCM rows, validated as OpenAI validates a batch file.

Every problem is a ``LineError`` with OpenAI's code, the 1-based line and the parameter at
fault; a file with any error runs nothing. Files are read twice, never held whole: a first
pass checks every line, a second yields the rows to store.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from pydantic import ValidationError

from pcm_service.protocol import (
    BatchEndpoint,
    ChatMessage,
    RowIn,
    SamplingSettings,
    StructuredOutput,
)

MAX_ERRORS = 100  # reported per file; the rest are counted

# body fields PCM maps onto vLLM (see ../shared/openai-batch.md §2); anything else is refused
_COMMON = {"model", "temperature", "top_p", "stop", "seed", "n", "presence_penalty",
           "frequency_penalty", "stream", "user", "metadata", "store",
           "top_k", "min_tokens", "repetition_penalty"}  # the last three: vLLM's extras
_FIELDS = {
    BatchEndpoint.CHAT: _COMMON | {"messages", "max_tokens", "max_completion_tokens", "logprobs",
                                   "top_logprobs", "response_format"},
    BatchEndpoint.COMPLETIONS: _COMMON | {"prompt", "max_tokens", "logprobs", "echo"},
}
_SAMPLING_NAMES = {"temperature", "top_p", "seed", "n", "presence_penalty", "frequency_penalty",
                   "top_k", "min_tokens", "repetition_penalty"}


@dataclass
class LineError:
    code: str
    message: str
    line: Optional[int] = None
    param: Optional[str] = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        param = f" ({self.param})" if self.param else ""
        return f"{where}{self.code}{param}: {self.message}"


class LineProblem(Exception):
    def __init__(self, code: str, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def openai_defaults(endpoint: BatchEndpoint) -> SamplingSettings:
    """What an OpenAI line gets for what it leaves out: temperature and top_p 1; chat runs to
    the end of the context unless limited, completions stop at 16 tokens (as vLLM serves)."""
    return SamplingSettings(temperature=1.0, top_p=1.0,
                            max_tokens=None if endpoint == BatchEndpoint.CHAT else 16)


def _messages(raw: Any) -> list[ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise LineProblem("invalid_request", "messages must be a non-empty array", "body.messages")
    out = []
    for i, m in enumerate(raw):
        where = f"body.messages[{i}]"
        if not isinstance(m, dict):
            raise LineProblem("invalid_type", "a message must be an object", where)
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only, joined as vLLM joins them
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise LineProblem("unsupported_parameter", "only text content parts are supported",
                                  f"{where}.content")
            content = "\n".join(p["text"] for p in content)
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise LineProblem("unsupported_parameter", f"message field {sorted(extra)[0]!r} is not supported",
                              f"{where}.{sorted(extra)[0]}")
        try:
            out.append(ChatMessage.model_validate({**m, "content": content}))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise LineProblem("invalid_value", err["msg"], f"{where}.{loc}") from None
    return out


def _structured(rf: Any) -> Optional[StructuredOutput]:
    where = "body.response_format"
    if not isinstance(rf, dict) or "type" not in rf:
        raise LineProblem("invalid_value", "response_format must be an object with a type", where)
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(json_object=True)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise LineProblem("missing_required_parameter", "json_schema.schema (an object) is required",
                              f"{where}.json_schema.schema")
        return StructuredOutput(json_schema=spec["schema"])
    raise LineProblem("invalid_value", f"response_format type {kind!r} is not one of text,"
                                       " json_object, json_schema", f"{where}.type")


def _sampling(body: dict[str, Any], endpoint: BatchEndpoint, defaults: SamplingSettings) -> SamplingSettings:
    values: dict[str, Any] = {k: body[k] for k in _SAMPLING_NAMES if body.get(k) is not None}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        values["max_tokens"] = limit
    stop = body.get("stop")
    if stop is not None:
        values["stop"] = [stop] if isinstance(stop, str) else stop
    if endpoint == BatchEndpoint.CHAT:
        if body.get("top_logprobs") is not None and body.get("logprobs") is not True:
            raise LineProblem("invalid_value", "top_logprobs needs logprobs: true", "body.top_logprobs")
        if body.get("logprobs") is True:
            values["logprobs"] = body.get("top_logprobs") or 0
        elif body.get("logprobs") not in (None, False):
            raise LineProblem("invalid_type", "logprobs must be a boolean", "body.logprobs")
        if body.get("response_format") is not None:
            values["structured"] = _structured(body["response_format"])
    elif body.get("logprobs") is not None:
        values["logprobs"] = body["logprobs"]
    try:
        return SamplingSettings.model_validate({**defaults.model_dump(), **values})
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "body"
        name = {"max_tokens": "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                "structured": "response_format"}.get(name, name)
        code = "invalid_type" if err["type"].endswith("_type") else "invalid_value"
        raise LineProblem(code, f"{name}: {err['msg']}", f"body.{name}") from None


def _row(obj: Any, endpoint: Optional[BatchEndpoint], defaults: Optional[SamplingSettings]
         ) -> tuple[str, BatchEndpoint, str, RowIn]:
    """One parsed line: (custom_id, endpoint, model, row); raises LineProblem."""
    if not isinstance(obj, dict):
        raise LineProblem("invalid_json_line", "This line is not a JSON object.")
    for key in ("custom_id", "method", "url", "body"):
        if key not in obj:
            raise LineProblem("missing_required_parameter", f"Missing required parameter: {key!r}.", key)
    extra = set(obj) - {"custom_id", "method", "url", "body"}
    if extra:
        name = sorted(extra)[0]
        raise LineProblem("unsupported_parameter", f"Unrecognized line field {name!r}.", name)
    custom_id, body = obj["custom_id"], obj["body"]
    if not isinstance(custom_id, str) or not custom_id:
        raise LineProblem("invalid_type", "custom_id must be a non-empty string", "custom_id")
    if obj["method"] != "POST":
        raise LineProblem("invalid_request", "method must be POST", "method")
    try:
        url = BatchEndpoint(obj["url"])
    except ValueError:
        raise LineProblem("invalid_url", f"url {obj['url']!r} is not one of "
                          f"{', '.join(e.value for e in BatchEndpoint)}", "url") from None
    if endpoint is not None and url != endpoint:
        raise LineProblem("invalid_url", f"url {url.value} does not match the batch's endpoint "
                          f"{endpoint.value}", "url")
    if not isinstance(body, dict):
        raise LineProblem("invalid_type", "body must be an object", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise LineProblem("invalid_request", "body.model is required (a string)", "body.model")
    if body.get("stream"):
        raise LineProblem("streaming_unsupported", "Streaming is not supported in a batch.", "body.stream")
    unknown = sorted(set(body) - _FIELDS[url])
    if unknown:
        raise LineProblem("unsupported_parameter", f"{unknown[0]!r} is not supported by PCM for {url.value}",
                          f"body.{unknown[0]}")
    if body.get("echo"):
        raise LineProblem("unsupported_parameter", "echo is not supported", "body.echo")
    sampling = _sampling(body, url, defaults or openai_defaults(url))
    if url == BatchEndpoint.CHAT:
        if "messages" not in body:
            raise LineProblem("invalid_request", "body.messages is required", "body.messages")
        row = RowIn(row_id=custom_id, messages=_messages(body["messages"]), sampling=sampling)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise LineProblem("invalid_request", "body.prompt is required: one string", "body.prompt")
        row = RowIn(row_id=custom_id, prompt=prompt, sampling=sampling)
    return custom_id, url, model, row


@dataclass
class BatchFileSummary:
    endpoint: Optional[BatchEndpoint]
    model: Optional[str]
    lines: int
    has_chat: bool
    errors: list[LineError]
    error_count: int


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            yield n, raw.decode("utf-8", errors="replace")


def check_batch_file(path: Path, endpoint: Optional[BatchEndpoint] = None,
                     known_model: Optional[Callable[[str], bool]] = None,
                     defaults: Optional[SamplingSettings] = None) -> BatchFileSummary:
    """Validate every line (first pass). ``endpoint``: the batch's; None takes the first line's."""
    errors: list[LineError] = []
    count = 0

    def add(err: LineError) -> None:
        nonlocal count
        count += 1
        if len(errors) < MAX_ERRORS:
            errors.append(err)

    seen: set[str] = set()
    model: Optional[str] = None
    lines = 0
    for n, text in _lines(path):
        if not text.strip():
            continue
        lines += 1
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            add(LineError("invalid_json_line", "This line is not parseable as valid JSON.", n))
            continue
        try:
            custom_id, url, line_model, _ = _row(obj, endpoint, defaults)
        except LineProblem as p:
            add(LineError(p.code, p.message, n, p.param))
            continue
        endpoint = endpoint or url
        if custom_id in seen:
            add(LineError("duplicate_custom_id", f"The custom_id {custom_id!r} for this request is a"
                          " duplicate of another request; custom_id must be unique.", n, "custom_id"))
        seen.add(custom_id)
        if model is None:
            model = line_model
            if known_model is not None and not known_model(model):
                add(LineError("model_not_found", f"The model {model!r} does not exist (see GET /v1/models"
                              " or `pcm model list`).", n, "body.model"))
        elif line_model != model:
            add(LineError("mismatched_model", f"The model {line_model!r} does not match the rest of the"
                          f" batch ({model!r}): one model per file.", n, "body.model"))
    if lines == 0:
        add(LineError("empty_file", "The input file has no requests."))
    return BatchFileSummary(endpoint, model, lines, endpoint == BatchEndpoint.CHAT, errors, count)


def read_batch_rows(path: Path, endpoint: BatchEndpoint,
                    defaults: Optional[SamplingSettings] = None) -> Iterator[RowIn]:
    """The rows of a file that ``check_batch_file`` passed (second pass)."""
    for _, text in _lines(path):
        if text.strip():
            yield _row(json.loads(text), endpoint, defaults)[3]

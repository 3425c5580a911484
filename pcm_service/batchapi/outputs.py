"""PCM row results → OpenAI Batch output and error lines (``chat.completion`` and
``text_completion`` bodies, OpenAI's logprobs shapes, ``batch_expired``/``batch_cancelled``)."""
from __future__ import annotations

import hashlib
from typing import Any, Optional

from pcm_service.protocol import BatchEndpoint, Choice, RowErrorCode, TokenLogprob

_NON_HTTP = {RowErrorCode.EXPIRED: "This request could not be executed before the completion window expired.",
             RowErrorCode.CANCELLED: "This request was not executed: its batch was cancelled."}


def _ids(workload_id: str, custom_id: str) -> tuple[str, str]:
    """Stable ids per request: rewriting an output file gives the same lines."""
    h = hashlib.sha256(f"{workload_id}\0{custom_id}".encode()).hexdigest()
    return f"batch_req_{h[:24]}", f"req_{h[24:48]}"


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def _chat_logprobs(lps: Optional[list[TokenLogprob]]) -> Optional[dict[str, Any]]:
    if lps is None:
        return None
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": _token_bytes(t.token),
                         "top_logprobs": [{"token": a.token, "logprob": a.logprob,
                                           "bytes": _token_bytes(a.token)} for a in t.top]}
                        for t in lps], "refusal": None}


def _completion_logprobs(lps: Optional[list[TokenLogprob]]) -> Optional[dict[str, Any]]:
    if lps is None:
        return None
    offsets, at = [], 0
    for t in lps:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{a.token: a.logprob for a in t.top} for t in lps], "text_offset": offsets}


def response_body(endpoint: BatchEndpoint, model: str, created: int, request_id: str,
                  choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt_tokens,
             "completion_tokens": sum(c.completion_tokens for c in choices),
             "total_tokens": prompt_tokens + sum(c.completion_tokens for c in choices)}
    if endpoint == BatchEndpoint.CHAT:
        return {"id": "chatcmpl-" + request_id[4:], "object": "chat.completion", "created": created,
                "model": model, "choices": [
                    {"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                     "logprobs": _chat_logprobs(c.logprobs), "finish_reason": c.finish_reason}
                    for i, c in enumerate(choices)], "usage": usage}
    return {"id": "cmpl-" + request_id[4:], "object": "text_completion", "created": created,
            "model": model, "choices": [
                {"index": i, "text": c.text, "logprobs": _completion_logprobs(c.logprobs),
                 "finish_reason": c.finish_reason} for i, c in enumerate(choices)], "usage": usage}


def output_line(workload_id: str, custom_id: str, endpoint: BatchEndpoint, model: str, created: int,
                choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
    line_id, request_id = _ids(workload_id, custom_id)
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id,
                         "body": response_body(endpoint, model, created, request_id, choices, prompt_tokens)},
            "error": None}


def error_line(workload_id: str, custom_id: str, code: Optional[RowErrorCode], message: str) -> dict[str, Any]:
    """A failed request: an HTTP-shaped error for a request that ran (400 when the engine
    refused it, 500 when PCM gave up on it), ``response: null`` for one that never ran."""
    line_id, request_id = _ids(workload_id, custom_id)
    if code in _NON_HTTP:
        assert code is not None
        return {"id": line_id, "custom_id": custom_id, "response": None,
                "error": {"code": code.value, "message": _NON_HTTP[code]}}
    status, kind = (400, "invalid_request_error") if code == RowErrorCode.REJECTED else (500, "server_error")
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id,
                         "body": {"error": {"message": message, "type": kind, "param": None,
                                            "code": code.value if code else None}}},
            "error": None}

"""Inference engines a library process can hold. One small class per engine.

An engine accepts requests one by one and is stepped; rows from many batches
share the engine, so it never idles between batches.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

from pcm_service.protocol import ContextSpec, SamplingSettings


@dataclass
class Completion:
    request_id: str
    text: Optional[str]
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int
    error: Optional[str] = None


class Engine(ABC):
    @abstractmethod
    def __init__(self, context: ContextSpec) -> None:
        """Start the engine for ``context`` (the context's start cost is paid here, once)."""

    @abstractmethod
    def add_request(self, request_id: str, prompt: str, sampling: SamplingSettings) -> None:
        """Queue one row; raises if the engine rejects that row."""

    @abstractmethod
    def step(self) -> list[Completion]:
        """Advance all queued rows; return the ones that finished."""

    @abstractmethod
    def has_unfinished(self) -> bool: ...

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        pass


class VllmEngine(Engine):
    """vLLM's ``LLMEngine`` driven step by step (what ``LLM.generate`` does inside)."""

    def __init__(self, context: ContextSpec) -> None:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        args = {"disable_log_stats": True, **context.engine.engine_args()}
        self._engine = LLMEngine.from_engine_args(EngineArgs(model=context.model, **args))

    @staticmethod
    def sampling_params(s: SamplingSettings):  # type: ignore[no-untyped-def]
        from vllm import SamplingParams

        return SamplingParams(
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
            min_tokens=s.min_tokens, seed=s.seed, stop=s.stop or None,
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty)

    def add_request(self, request_id: str, prompt: str, sampling: SamplingSettings) -> None:
        self._engine.add_request(request_id, prompt, self.sampling_params(sampling))

    def step(self) -> list[Completion]:
        done = []
        for out in self._engine.step():
            if not out.finished:
                continue
            c = out.outputs[0]  # type: ignore[index]  # a generation's outputs: a list of completions
            done.append(Completion(request_id=out.request_id, text=c.text,
                                   finish_reason=c.finish_reason,
                                   prompt_tokens=len(out.prompt_token_ids or []),
                                   completion_tokens=len(c.token_ids)))
        return done

    def has_unfinished(self) -> bool:
        return self._engine.has_unfinished_requests()

    def shutdown(self) -> None:
        core = getattr(self._engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


ENGINES: dict[str, type[Engine]] = {"vllm": VllmEngine}

"""Inference engines a library process can hold. One small class per engine.

An engine accepts requests one by one and is stepped; rows from many batches
share the engine, so it never idles between batches.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

from pcm_service.protocol import (
    ChatMessage,
    Choice,
    ContextSpec,
    EngineSettings,
    SamplingSettings,
    TokenLogprob,
    TopLogprob,
)


@dataclass
class Completion:
    request_id: str
    text: Optional[str]
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int
    error: Optional[str] = None
    choices: Optional[list[Choice]] = None  # set when there are several or they carry logprobs


class Engine(ABC):
    capacity: int = 64  # rows the engine runs at once (its scheduler's max_num_seqs)

    @abstractmethod
    def __init__(self, context: ContextSpec) -> None:
        """Start the engine for ``context`` (the context's start cost is paid here, once)."""

    @abstractmethod
    def add_request(self, request_id: str, prompt: Optional[str], messages: Optional[list[ChatMessage]],
                    sampling: SamplingSettings) -> None:
        """Queue one row (a prompt, or messages for the model's chat template); raises if the
        engine rejects that row."""

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
        from vllm.platforms import current_platform
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine

        if current_platform.is_cpu():
            # vLLM's CPU worker binds itself to some of the cores and sizes OpenMP to them; an
            # MKL_NUM_THREADS above that (TaskVine and HTCondor set it to the slot's cores)
            # oversubscribes the bound cores: 25x slower steps on a 2-core slot. Unset, MKL
            # follows OpenMP.
            os.environ.pop("MKL_NUM_THREADS", None)
        args = self.engine_args(context.engine)
        # offline batch inference, as LLM.generate: its scheduler defaults (on CPU 256 sequences and
        # 4096 tokens per step, 1024 and 16384 on an H100/H200, vs 128 and 2048 for ENGINE_CONTEXT)
        self._engine = LLMEngine.from_engine_args(EngineArgs(model=context.model, **args),
                                                  usage_context=UsageContext.LLM_CLASS)
        self.capacity = self._engine.vllm_config.scheduler_config.max_num_seqs
        self._max_model_len = self._engine.model_config.max_model_len
        self._top_logprobs: dict[str, int] = {}  # request → how many alternatives per token

    @staticmethod
    def engine_args(settings: EngineSettings) -> dict[str, Any]:
        """vLLM's arguments for the workload's engine settings (also what bench/throughput.py
        gives ``LLM`` for the raw side)."""
        from vllm.platforms import current_platform

        args = {"disable_log_stats": True, **settings.engine_args()}
        if current_platform.is_cpu():
            # vLLM 0.32's CPU build kills the engine when a seeded request's prefill is chunked
            # ("CPU Generator does not use offset"): without chunking no prefill is ever partial
            args.setdefault("enable_chunked_prefill", False)
        return args

    @staticmethod
    def sampling_params(s: SamplingSettings, max_tokens: int):  # type: ignore[no-untyped-def]
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if s.structured is not None:
            c = s.structured
            structured = StructuredOutputsParams(json=c.json_schema, json_object=c.json_object or None,
                                                 regex=c.regex, choice=c.choice, grammar=c.grammar)
        return SamplingParams(
            output_kind=RequestOutputKind.FINAL_ONLY,  # as LLM.generate: one output per request, all n choices
            n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=max_tokens,
            min_tokens=s.min_tokens, seed=s.seed, stop=s.stop or None,
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty, logprobs=s.logprobs,
            structured_outputs=structured)

    def render_chat(self, messages: list[ChatMessage]) -> list[int]:
        """The conversation as the model's chat template renders it, with the generation prompt,
        tokenized without extra special tokens: what ``LLM.chat`` feeds the engine."""
        tok = self._engine.get_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise ValueError("the model has no chat template: send a prompt, not messages")
        convo: Any = [m.model_dump(exclude_none=True, mode="json") for m in messages]
        text = tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        return list(tok.encode(str(text), add_special_tokens=False))

    def add_request(self, request_id: str, prompt: Optional[str], messages: Optional[list[ChatMessage]],
                    sampling: SamplingSettings) -> None:
        engine_input: Any
        if messages is not None:
            ids = self.render_chat(messages)
            engine_input = {"prompt_token_ids": ids}
            # OpenAI's chat default: generate until the context is full
            max_tokens = sampling.max_tokens or max(1, self._max_model_len - len(ids))
        else:
            engine_input = prompt
            max_tokens = sampling.max_tokens or 16
        self._engine.add_request(request_id, engine_input, self.sampling_params(sampling, max_tokens))
        if sampling.logprobs is not None:
            self._top_logprobs[request_id] = sampling.logprobs

    @staticmethod
    def _logprobs(c: Any, k: int) -> Optional[list[TokenLogprob]]:
        """vLLM gives, per position, the top ``k`` and the sampled token (whatever its rank)."""
        if c.logprobs is None:
            return None
        out = []
        for tok_id, position in zip(c.token_ids, c.logprobs, strict=False):
            chosen = position[tok_id]
            top = sorted((lp for lp in position.values() if lp.rank is not None and lp.rank <= k),
                         key=lambda lp: lp.rank)
            out.append(TokenLogprob(token=chosen.decoded_token or "", logprob=chosen.logprob,
                                    top=[TopLogprob(token=lp.decoded_token or "", logprob=lp.logprob)
                                         for lp in top]))
        return out

    def step(self) -> list[Completion]:
        done = []
        for out in self._engine.step():
            if not out.finished:
                continue
            outs: list[Any] = list(out.outputs)  # type: ignore[arg-type]  # one output per choice
            first = outs[0]
            choices = None
            k = self._top_logprobs.pop(out.request_id, 0)
            if len(outs) > 1 or first.logprobs is not None:
                choices = [Choice(text=c.text, finish_reason=c.finish_reason, completion_tokens=len(c.token_ids),
                                  logprobs=self._logprobs(c, k)) for c in sorted(outs, key=lambda c: c.index)]
            done.append(Completion(request_id=out.request_id, text=first.text,
                                   finish_reason=first.finish_reason,
                                   prompt_tokens=len(out.prompt_token_ids or []),
                                   completion_tokens=sum(len(c.token_ids) for c in outs),
                                   choices=choices))
        return done

    def has_unfinished(self) -> bool:
        return self._engine.has_unfinished_requests()

    def shutdown(self) -> None:
        core = getattr(self._engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


ENGINES: dict[str, type[Engine]] = {"vllm": VllmEngine}

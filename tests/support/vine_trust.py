"""The TaskVine Library of tests/test_taskvine_trust.py (imported by reference in the library
process as tests.support.vine_trust: the repository root is on the vine_worker's PYTHONPATH):
PCM's own library functions around an echo engine, plus what a hostile or damaged worker does,
switched on by its environment."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from pcm_service.protocol import ChatMessage, ContextSpec, SamplingSettings
from worker_image import vine_library
from worker_image.engines import ENGINES, Completion, Engine

WEIGHTS = "model.safetensors"


class EchoEngine(Engine):
    """Answers each prompt with itself; each start appends the weights it was given to
    $PCM_TEST_STARTS, so the test sees whether (and on what) an engine started."""

    def __init__(self, context: ContextSpec) -> None:
        seen = Path(context.model, WEIGHTS).read_bytes().decode(errors="replace")
        with open(os.environ["PCM_TEST_STARTS"], "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "weights": seen}) + "\n")
        self.pending: list[Completion] = []

    def add_request(self, request_id: str, prompt: Optional[str], messages: Optional[list[ChatMessage]],
                    sampling: SamplingSettings) -> None:
        self.pending.append(Completion(request_id=request_id, text=prompt, finish_reason="stop",
                                       prompt_tokens=1, completion_tokens=1))

    def step(self) -> list[Completion]:
        done, self.pending = self.pending, []
        return done

    def has_unfinished(self) -> bool:
        return bool(self.pending)


ENGINES["echo"] = EchoEngine


def load_engine(context_json: str, engine: str, manifest_json: str) -> None:
    """PCM's context function; first, while the file $PCM_TEST_POISON exists, the worker's copy
    of the weights is altered once (what a poisoned peer transfer leaves in its cache)."""
    poison = os.environ.get("PCM_TEST_POISON")
    if poison and os.path.exists(poison):
        os.remove(poison)
        Path(vine_library.MODEL_INPUT, WEIGHTS).write_bytes(b"poisoned weights")
    vine_library.load_engine(context_json, engine, manifest_json)


class RunsCode:
    """Pickles as a call of os.system: whoever unpickles it touches $PCM_TEST_PWNED."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def run_batch(lease_json: str) -> Any:
    """PCM's call, unless $PCM_TEST_PWNED is set: then a pickle that runs code on load."""
    marker = os.environ.get("PCM_TEST_PWNED")
    if marker:
        return RunsCode(marker)
    return vine_library.run_batch(lease_json)

"""Models for tests: a directory the service accepts (no engine loads it), and vLLM's own
LLM.generate on the tiny model as the reference every engine test compares against."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import REPO

ENGINE: dict[str, Any] = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True,
                          "kv_cache_memory_bytes": 128 * 2**20}


def fake_model(d: Path) -> Path:
    """A directory the service accepts as a model (config.json + a weight file); no engine loads it."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"not really weights")
    return d


_REFERENCE: dict[str, list[str]] = {}  # one reference run per distinct request in a session


def reference_texts(model: Path, prompts: list[str], engine: dict[str, Any],
                    sampling: dict[str, Any], tmp: Path) -> list[str]:
    """vLLM's own LLM.generate on ``prompts``, in a separate process (tests/reference_generate.py)."""
    key = json.dumps([str(model), prompts, engine, sampling], sort_keys=True)
    if key not in _REFERENCE:
        _REFERENCE[key] = _reference_texts(model, prompts, engine, sampling, tmp)
    return _REFERENCE[key]


def _reference_texts(model: Path, prompts: list[str], engine: dict[str, Any],
                     sampling: dict[str, Any], tmp: Path) -> list[str]:
    from pcm_service.protocol import EngineSettings, SamplingSettings

    (tmp / "prompts.json").write_text(json.dumps(prompts))
    (tmp / "engine.json").write_text(EngineSettings(**engine).model_dump_json())
    (tmp / "sampling.json").write_text(SamplingSettings(**sampling).model_dump_json())
    ref = subprocess.run([sys.executable, str(REPO / "tests" / "reference_generate.py"), str(model),
                          str(tmp / "prompts.json"), str(tmp / "engine.json"), str(tmp / "sampling.json"),
                          str(tmp / "texts.json")],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return json.loads((tmp / "texts.json").read_text())

"""OpenAI batch files for tests, and vLLM's own answer to each of their lines."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import REPO

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def line(custom_id: str, body: dict[str, Any], url: str = CHAT) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def chat_body(model: str, text: str, **sampling: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "system", "content": "You check claims."},
                                         {"role": "user", "content": text}], **sampling}


def write_lines(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def reference_choices(model: Path, engine: dict[str, Any], batch: Path, tmp: Path) -> dict[str, list[str]]:
    """custom_id → the texts of vLLM's choices for that line run alone (tests/reference_openai.py)."""
    (tmp / "engine.json").write_text(json.dumps(engine))
    out = tmp / f"{batch.stem}.reference.json"
    ref = subprocess.run([sys.executable, str(REPO / "tests" / "reference_openai.py"), str(model),
                          str(tmp / "engine.json"), str(batch), str(out)],
                         capture_output=True, text=True, timeout=900, cwd=REPO)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return json.loads(out.read_text())


def read_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in text.splitlines() if x.strip()]

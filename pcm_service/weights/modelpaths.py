"""Which directories the service may read model weights from.

Every file of a registered model is served as chunks to any holder of the pool token, and
pool tokens live on machines the service's owner does not control. So a model directory
must sit under a configured model root (symlinks followed), look like a model, hold only
regular files, and never be, contain or sit inside the service's state directory or any
token or key file. Anything else is refused before a single byte is read. What passes is
pinned (``RegisteredFile``): the origin later reads exactly those inodes, through no link.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pcm_service.weights.chunks import RegisteredFile

IGNORED_PREFIX = ".pcm-"  # PCM's own bookkeeping files inside a model directory
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MAX_MODEL_FILES = 10_000  # a model has a few dozen files; more is not a model (and costs hours to hash)


class ModelUnavailable(ValueError):
    """The service will not (or cannot) use this directory as a model's origin copy."""


def no_chat_template(model: str | Path) -> str:
    """The one message for chat rows sent to a model without a chat template."""
    return (f"model {model} has no chat template (no chat_template in its tokenizer_config.json):"
            " chat rows need one; send prompts instead")


def has_chat_template(model_dir: str | Path) -> bool:
    """Whether the tokenizer in ``model_dir`` carries a chat template (where transformers looks)."""
    d = Path(model_dir)
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return True
    try:
        cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(isinstance(cfg, dict) and cfg.get("chat_template"))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


@dataclass(frozen=True)
class ModelPolicy:
    """``roots``: directories models may come from; ``secrets``: files and directories never
    served (the state directory, token files, the TLS key). Both resolved on construction."""

    roots: tuple[Path, ...] = ()
    secrets: tuple[Path, ...] = ()

    @classmethod
    def of(cls, roots: Iterable[str | Path], secrets: Iterable[str | Path]) -> "ModelPolicy":
        return cls(tuple(Path(r).resolve() for r in roots), tuple(Path(s).resolve() for s in secrets))

    def _secret_inodes(self) -> set[tuple[int, int]]:
        out = set()
        for s in self.secrets:
            try:
                st = s.stat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.add((st.st_dev, st.st_ino))
        return out

    def _check_place(self, real: Path, what: str) -> None:
        if not any(_inside(real, r) for r in self.roots):
            roots = ", ".join(str(r) for r in self.roots)
            raise ModelUnavailable(f"{what} resolves to {real}, which is outside every model root ({roots});"
                                   " put the model under one or start `pcm serve --model-root DIR`")
        for s in self.secrets:
            if _inside(real, s):
                raise ModelUnavailable(f"{what} resolves to {real}, inside {s}, which the service never"
                                       " serves (its state directory, a token or a key)")

    def check(self, path: str | Path) -> dict[str, Path]:
        """The model's files: relative name → real path pinned to the inode checked (a
        RegisteredFile, which the origin reads through no link). Raises ModelUnavailable."""
        text = str(path)
        if not text.strip():
            raise ModelUnavailable("is empty: give the absolute path of a model directory")
        p = Path(text)
        if not p.is_absolute():
            raise ModelUnavailable(f"{text!r} is not an absolute path (the CLI resolves workload paths)")
        if not self.roots:
            raise ModelUnavailable("the service has no model roots, so it reads no model from a path:"
                                   " start it with `pcm serve --model-root DIR`")
        try:
            real = p.resolve(strict=True)
        except OSError as e:
            raise ModelUnavailable(f"model directory {p} does not exist or the service cannot read it"
                                   f" ({e.strerror or e})") from None
        if not real.is_dir():
            raise ModelUnavailable(f"{p} is not a directory")
        self._check_place(real, str(p))
        for s in self.secrets:
            if _inside(s, real):
                raise ModelUnavailable(f"{p} contains {s}, which the service never serves (its state"
                                       " directory, a token or a key); name the model's own directory")
        if not (real / "config.json").is_file():
            raise ModelUnavailable(f"{p} has no config.json: not a Hugging Face model directory")
        files = self._walk(real)
        if not any(name.endswith(WEIGHT_SUFFIXES) for name in files):
            raise ModelUnavailable(f"{p} has no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
        return files

    def _walk(self, top: Path) -> dict[str, Path]:
        secret_inodes = self._secret_inodes()
        files: dict[str, Path] = {}
        stats: dict[str, os.stat_result] = {}
        stack = [top]
        seen = 0
        while stack:
            d = stack.pop()
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
            for e in entries:
                seen += 1
                if seen > MAX_MODEL_FILES:
                    raise ModelUnavailable(f"{top} has more than {MAX_MODEL_FILES} entries: not a model directory")
                path = Path(e.path)
                rel = path.relative_to(top).as_posix()
                if e.name.startswith(IGNORED_PREFIX):
                    continue
                st = path.lstat()
                if stat.S_ISDIR(st.st_mode):
                    stack.append(path)
                    continue
                if stat.S_ISLNK(st.st_mode):
                    try:
                        target = path.resolve(strict=True)
                        st = target.stat()
                    except (OSError, RuntimeError):
                        raise ModelUnavailable(f"{top}/{rel} is a dangling symbolic link") from None
                    if not stat.S_ISREG(st.st_mode):
                        raise ModelUnavailable(f"{top}/{rel} links to {_kind(st.st_mode)}: a model holds"
                                               " only regular files")
                    self._check_place(target, f"{top}/{rel}")
                elif not stat.S_ISREG(st.st_mode):
                    raise ModelUnavailable(f"{top}/{rel} is {_kind(st.st_mode)}: a model holds only regular files")
                else:
                    target = path
                if (st.st_dev, st.st_ino) in secret_inodes:
                    raise ModelUnavailable(f"{top}/{rel} is a token or key file of the service")
                files[rel] = RegisteredFile.pinned(target, st)
                stats[rel] = st
        _check_hard_links(top, files, stats)
        return dict(sorted(files.items()))


def _check_hard_links(top: Path, files: dict[str, Path], stats: dict[str, os.stat_result]) -> None:
    """Every name of a hard-linked file must be one checked here: another name could sit
    anywhere (the state directory's database, a user's key), and no walk of the model finds it."""
    names: dict[tuple[int, int], set[Path]] = {}
    for rel, st in stats.items():
        names.setdefault((st.st_dev, st.st_ino), set()).add(files[rel])
    for rel, st in stats.items():
        known = len(names[(st.st_dev, st.st_ino)])
        if st.st_nlink > known:
            raise ModelUnavailable(f"{top}/{rel} has {st.st_nlink} hard links, {known} of them in the model:"
                                   " the others may be any file; copy it into the model instead")

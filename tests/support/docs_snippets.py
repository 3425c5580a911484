"""The documentation read as a test reads it: the fenced blocks of README.md and docs/*.md with
their marks (``<!-- test: run -->``, ``<!-- test: skip (why) -->``, ``<!-- test: file NAME -->``
on the line before the fence), and every `pcm` (and ``python -m bench.NAME``) command line and
flag they show, resolved against the CLI's command tree (and the benchmarks' argparse flags)."""
from __future__ import annotations

import ast
import enum
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import yaml

from tests.support import REPO

SHELL = {"bash", "sh", "shell", "console"}
PYTHON = {"python", "py"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
MARK = re.compile(r"^<!--\s*test:\s*(?P<kind>\w+)\s*(?P<arg>.*?)\s*-->$")
SKIP_REASON = re.compile(r"^\((?P<reason>.+)\)$")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FLAG = re.compile(r"^(--?[A-Za-z][\w-]*)")
PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*")  # COMMAND, NAME: a word the reader fills in
# programs whose flags the docs show but this check does not know: their flags are not pcm's
FOREIGN = {"make", "vine_worker", "vine_status", "pip", "curl", "mkdocs", "apptainer", "python", "python3",
           "systemctl", "condor_submit", "condor_q", "git", "conda", "chmod", "cp", "head", "ls"}


class MarkKind(str, enum.Enum):
    RUN = "run"  # executed against the test's `pcm serve`
    SKIP = "skip"  # not executed, for the reason given (a pool, a GPU, minutes of runtime)
    FILE = "file"  # written into the snippets' directory under the name given, before any runs


@dataclass(frozen=True)
class Block:
    """One fenced block: where it starts (the fence's line), its language, text and mark."""

    file: str
    line: int
    lang: str
    text: str
    mark: Optional[MarkKind]
    arg: str  # the skip's reason or the file's name

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def doc_files() -> list[Path]:
    """README.md, then the site's pages in mkdocs.yml's nav order (any page not in it last)."""
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]

    def pages(entry: object) -> Iterator[str]:
        if isinstance(entry, str):
            yield entry
        elif isinstance(entry, dict):
            for v in entry.values():
                yield from pages(v)
        elif isinstance(entry, list):
            for v in entry:
                yield from pages(v)

    ordered = [REPO / "docs" / p for p in pages(nav)]
    rest = sorted(p for p in (REPO / "docs").glob("*.md") if p not in ordered)
    return [REPO / "README.md", *ordered, *rest]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def parse(path: Path) -> tuple[list[Block], list[Problem], list[tuple[int, str]]]:
    """The file's fenced blocks, the problems with its marks, and its prose lines (outside fences
    and marks) with their numbers, for the inline-code check."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[Problem] = []
    prose: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = FENCE.match(line)
        stripped = line.strip()
        if not m:
            if stripped.startswith("<!--") and "test:" in stripped and not MARK.match(stripped):
                problems.append(Problem(f"{rel(path)}:{i + 1}", f"a malformed test mark: {stripped}"))
            elif not MARK.match(stripped):
                prose.append((i + 1, line))
            i += 1
            continue
        indent, fence, lang = m["indent"], m["fence"], m["lang"].lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and set(lines[j].strip()) == {fence[0]}):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        where = f"{rel(path)}:{i + 1}"
        mark: Optional[MarkKind] = None
        arg = ""
        prev = MARK.match(lines[i - 1].strip()) if i > 0 else None
        if prev is not None:
            try:
                mark = MarkKind(prev["kind"])
            except ValueError:
                problems.append(Problem(where, f"unknown test mark {prev['kind']!r} (run, skip or file)"))
            arg = prev["arg"]
            if mark == MarkKind.SKIP:
                reason = SKIP_REASON.match(arg)
                if reason is None:
                    problems.append(Problem(where, "a skip mark needs its reason: <!-- test: skip (why) -->"))
                arg = reason["reason"] if reason else ""
            if mark == MarkKind.FILE and not re.fullmatch(r"[\w.-]+", arg):
                problems.append(Problem(where, f"a file mark needs a plain file name, not {arg!r}"))
        blocks.append(Block(rel(path), i + 1, lang, "\n".join(body) + "\n", mark, arg))
        i = j + 1
    return blocks, problems, prose


def mark_problems(blocks: list[Block]) -> list[Problem]:
    """Every fence names its language; every shell or Python block is marked run or skip."""
    problems = []
    for b in blocks:
        if not b.lang:
            problems.append(Problem(b.where, "a fence without a language (say bash, python, yaml, text, ...)"))
        elif b.lang in SHELL | PYTHON and b.mark not in (MarkKind.RUN, MarkKind.SKIP):
            problems.append(Problem(b.where, f"a {b.lang} block without <!-- test: run --> or"
                                             " <!-- test: skip (why) --> on the line before it"))
        elif b.lang not in SHELL | PYTHON and b.mark in (MarkKind.RUN, MarkKind.SKIP):
            problems.append(Problem(b.where, f"a {b.mark.value} mark on a {b.lang} block (only shell and"
                                             " Python run; mark data with <!-- test: file NAME -->)"))
    return problems


def shell_lines(block: Block) -> list[str]:
    """The block's command lines: continuations joined, comments dropped, console prompts read."""
    text = block.text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if block.lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.append(line)
    return out


def commands_in(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ``&&``, ``||``, ``|``, ``;``, ``&``), as words,
    with leading variable assignments dropped."""
    out = []
    for part in re.split(r"\s(?:&&|\|\||\||;|&)(?=\s|$)", line):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            words = words[1:]
        if words:
            out.append(words)
    return out


# ----- the CLI check ----------------------------------------------------------------------


class CommandTree:
    """`pcm`'s click command tree (typer's), and the benchmarks' argparse flags."""

    def __init__(self) -> None:
        from typer.main import get_command

        from pcm_service.cli import app

        self.root = get_command(app)
        self.every_option = set().union(*(self.options(c) for c in self.walk(self.root)))

    def walk(self, cmd: object) -> Iterator[object]:
        yield cmd
        for sub in getattr(cmd, "commands", {}).values():
            yield from self.walk(sub)

    @staticmethod
    def options(cmd: object) -> set[str]:
        names = {"--help"}
        for p in getattr(cmd, "params", []):
            if p.param_type_name == "option":
                names.update(p.opts)
                names.update(p.secondary_opts)
        return names

    def resolve(self, args: list[str]) -> tuple[list[tuple[str, object]], list[str], Optional[str]]:
        """``pcm ARGS`` → the commands it names (``a|b`` names several) with their paths, the
        words after them, or why it names none."""
        found: list[tuple[str, object]] = [("pcm", self.root)]
        i = 0
        while i < len(args) and all(hasattr(c, "commands") for _, c in found) and not args[i].startswith("-"):
            names = args[i].split("|")
            nxt: list[tuple[str, object]] = []
            for path, cmd in found:
                if PLACEHOLDER.fullmatch(args[i]):  # `pcm COMMAND --help`: any of them
                    nxt.extend((f"{path} {n}", sub) for n, sub in cmd.commands.items())  # type: ignore[attr-defined]
                    continue
                for name in names:
                    sub = cmd.commands.get(name)  # type: ignore[attr-defined]
                    if sub is None:
                        known = ", ".join(cmd.commands)  # type: ignore[attr-defined]
                        return [], [], f"`{path}` has no command {name!r} (it has {known})"
                    nxt.append((f"{path} {name}", sub))
            found = nxt
            i += 1
        return found, args[i:], None

    @staticmethod
    def bench_options(module: str) -> Optional[set[str]]:
        """The flags ``python -m bench.MODULE`` takes, read from its add_argument calls (None: no
        such benchmark); importing or running it would cost seconds each."""
        path = REPO / "bench" / f"{module}.py"
        if not path.is_file():
            return None
        names = {"-h", "--help"}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                names.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
        return names


def flags_of(words: list[str]) -> list[str]:
    """The flags among ``words`` (``--x=1`` → ``--x``; ``[--a N]`` and ``--a/--no-a`` read too)."""
    out = []
    for w in words:
        for piece in re.split(r"[\[\]()/,]", w):
            m = FLAG.match(piece)
            if m:
                out.append(m[1])
    return out


@dataclass(frozen=True)
class Mention:
    """A command line or a lone flag the docs show, with the commands of its paragraph."""

    where: str
    words: list[str]  # a command's words, or [flag] for a lone flag in inline code
    lone: bool
    context: tuple[tuple[str, ...], ...] = ()  # the paragraph's command lines (lone flags only)


def mentions(path: Path, blocks: list[Block], prose: list[tuple[int, str]]) -> Iterator[Mention]:
    """Every command line in shell blocks and inline code, and every lone ``--flag`` in inline
    code with the command lines of its paragraph (a table row or a list item is one too)."""
    for b in blocks:
        if b.lang in SHELL:
            for line in shell_lines(b):
                for words in commands_in(line):
                    yield Mention(b.where, words, False)
    unit: list[tuple[int, str]] = []

    def flush() -> Iterator[Mention]:
        spans = [(n, s) for n, text in unit for s in CODE_SPAN.findall(text)]
        cmds = tuple(tuple(s.split()) for _, s in spans if " " in s and not s.startswith("-"))
        for n, s in spans:
            if s.startswith("-") and FLAG.match(s):
                yield Mention(f"{rel(path)}:{n}", [FLAG.match(s)[1]], True, cmds)  # type: ignore[index]
            elif " " in s:
                yield Mention(f"{rel(path)}:{n}", s.split(), False)

    for n, line in prose:
        starts_unit = not line.strip() or re.match(r"^\s*(\||[-*] |\d+\. |#)", line)
        if starts_unit:
            yield from flush()
            unit = []
        if line.strip():
            unit.append((n, line))
    yield from flush()


def cli_problems(tree: CommandTree, m: Mention) -> list[Problem]:
    """What is wrong with one mention: an unknown `pcm` command or benchmark, or a flag that is
    none of its command's options."""
    if m.lone:
        flag = m.words[0]
        checked = [c for c in m.context if c[0] == "pcm" or _is_bench(list(c))]
        owners = [o for c in checked for o in _owners(tree, list(c))]
        if not owners:
            if any(c[0] in FOREIGN for c in m.context):
                return []  # a paragraph about another program's flags
            owners = [tree.every_option]
        if any(flag in o for o in owners):
            return []
        cmds = "; ".join(" ".join(c) for c in checked) or "any pcm command"
        return [Problem(m.where, f"{flag}: no such option of {cmds}")]
    words = m.words
    if words[0] == "pcm" or words[0].endswith("/pcm"):
        found, rest, why = tree.resolve(words[1:])
        if why:
            return [Problem(m.where, f"{' '.join(words)}: {why}")]
        opts: set[str] = set().union(*(tree.options(c) for _, c in found))
        names = " or ".join(p for p, _ in found)
        return [Problem(m.where, f"{' '.join(words)}: `{names}` has no option {f}")
                for f in flags_of(rest) if f not in opts]
    if _is_bench(words):
        module = words[2].removeprefix("bench.")
        if PLACEHOLDER.fullmatch(module):
            return []  # `python -m bench.NAME`
        bench = tree.bench_options(module)
        if bench is None:
            return [Problem(m.where, f"{' '.join(words)}: no benchmark bench/{module}.py")]
        return [Problem(m.where, f"{' '.join(words)}: {words[2]} has no option {f}")
                for f in flags_of(words[3:]) if f not in bench]
    return []


def _is_bench(words: list[str]) -> bool:
    return len(words) > 2 and words[0] in ("python", "python3") and words[1] == "-m" and words[2].startswith("bench.")


def _owners(tree: CommandTree, words: list[str]) -> list[set[str]]:
    """The option sets of the command(s) ``words`` names (none for an unknown one)."""
    if words[0] == "pcm":
        found, _, why = tree.resolve(words[1:])
        return [] if why else [tree.options(c) for _, c in found]
    if _is_bench(words):
        opts = tree.bench_options(words[2].removeprefix("bench."))
        return [opts] if opts else []
    return []

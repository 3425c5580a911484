"""The documentation cannot go stale: every shell and Python block in README.md and docs/*.md is
marked run or skip, the marked-run ones run against a real `pcm serve` with one worker on the
tiny model (in a directory laid out as a checkout: configs/, build/models/tiny-llama, the
files the docs show), every `pcm` command and flag the docs show exists, the metrics the docs
list are the ones served, and the generated references hold every field. `make docs` (in
`make test`) builds the site with --strict, and docs/hooks.py fails that build when a model
field has no description or a description names no field."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from pcm_service.cli import app
from tests.support import REPO
from tests.support.docs_snippets import (
    PYTHON,
    SHELL,
    Block,
    CommandTree,
    MarkKind,
    Problem,
    cli_problems,
    doc_files,
    mark_problems,
    mentions,
    parse,
    shell_lines,
)
from tests.support.serve import ServeProcess

PARSED = {rel: parse(path) for path in doc_files() for rel in [str(path.relative_to(REPO))]}
BLOCKS = [b for blocks, _, _ in PARSED.values() for b in blocks]
RUN = [b for b in BLOCKS if b.mark == MarkKind.RUN]
CLIENT_ENV = ("PCM_API_TOKEN", "PCM_POOL_TOKEN", "PCM_METRICS_TOKEN", "PCM_API_TOKEN_FILE", "PCM_POOL_TOKEN_FILE",
              "PCM_METRICS_TOKEN_FILE", "PCM_TOKEN_FILE", "PCM_CA_FILE", "PCM_SERVICE_URL")
SNIPPET_TIMEOUT = 300  # the first workload waits for the worker's engine (~30-40 s on 2 cores)


def load_hooks() -> ModuleType:
    """docs/hooks.py, as mkdocs loads it (a file, not a package module)."""
    if "pcm_docs_hooks" in sys.modules:
        return sys.modules["pcm_docs_hooks"]
    spec = importlib.util.spec_from_file_location("pcm_docs_hooks", REPO / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_shell_and_python_block_is_marked_run_or_skip() -> None:
    problems = [p for _, probs, _ in PARSED.values() for p in probs] + mark_problems(BLOCKS)
    assert not problems, "\n".join(map(str, problems))
    assert len(RUN) >= 10, [b.where for b in RUN]  # the run set stays meaningful


def test_every_pcm_command_and_flag_the_docs_show_exists() -> None:
    tree = CommandTree()
    problems: list[Problem] = []
    paths: set[tuple[str, ...]] = set()
    for rel, (blocks, _, prose) in PARSED.items():
        for m in mentions(REPO / rel, blocks, prose):
            problems += cli_problems(tree, m)
            if not m.lone and m.words[0] == "pcm":
                found, _, why = tree.resolve(m.words[1:])
                paths.update(tuple(p.split()[1:]) for p, _ in found if why is None)
    assert not problems, "\n".join(map(str, problems))
    runner = CliRunner()
    for path in sorted(paths):  # and each command the docs name answers --help
        r = runner.invoke(app, [*path, "--help"])
        assert r.exit_code == 0, (path, r.output)
    assert len(paths) >= 15, paths


def test_readme_links_lead_to_files() -> None:
    text = (REPO / "README.md").read_text()
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t and not t.startswith("#")]
    missing = [t for t in links if not (REPO / t.split("#")[0]).exists()]
    assert links and not missing, missing


def test_the_generated_workload_reference_lists_every_field() -> None:
    from pcm_service.protocol import EngineSettings, SamplingSettings
    from pcm_service.protocol.workloads import StructuredOutput
    from pcm_service.workload import InputSpec, MessageTemplate, WorkloadFile

    page = load_hooks().workload_reference()
    for prefix, model in (("", WorkloadFile), ("engine", EngineSettings), ("sampling", SamplingSettings),
                          ("sampling.structured", StructuredOutput), ("inputs", InputSpec),
                          ("inputs.messages[]", MessageTemplate)):
        heading = f"### `{prefix}`" if prefix else "### Top level"
        assert heading in page, heading
        section = page.split(heading, 1)[1].split("\n### ", 1)[0]
        for name in model.model_fields:
            assert f"| `{name}` |" in section, (prefix, name)
    assert "| required |" in page and "Most tokens generated per row" in page


def test_a_field_without_description_or_a_description_without_field_fails(tmp_path: Path) -> None:
    hooks = load_hooks()
    from pcm_service.workload import WorkloadFile

    described = (REPO / "docs" / "workload-fields.yaml").read_text()
    broken = tmp_path / "workload-fields.yaml"
    broken.write_text(described.replace("\nbatch_size:", "\nbatch_sizes:"))
    with pytest.raises(hooks.DocsError) as e:
        hooks.render_fields(WorkloadFile, broken, "Top level")
    assert "field 'batch_size' has no description" in str(e.value)
    assert "describes 'batch_sizes', which is no field" in str(e.value)


def test_the_cli_reference_shows_every_command_and_option() -> None:
    hooks = load_hooks()
    page = hooks.cli_reference()
    sections = {s.split("`", 1)[0]: s for s in ("\n" + page).split("\n## `")[1:]}
    for c in hooks.cli_commands():
        section = sections[" ".join(("pcm", *c.path))]
        for p in c.command.params:
            for opt in (*p.opts, *p.secondary_opts) if p.param_type_name == "option" else (p.name.upper(),):
                assert re.search(rf"`[^`]*(?<![\w-]){re.escape(opt)}(?![\w-])", section), (c.path, opt)


# ----- the snippets, run ------------------------------------------------------------------


@dataclass
class Checkout:
    """Where the snippets run: laid out as a checkout, with the test's service and worker."""

    dir: Path
    serve: ServeProcess
    env: dict[str, str]


def write_files(dest: Path) -> None:
    """The blocks marked ``file NAME``; two marks of one name must agree."""
    seen: dict[str, Block] = {}
    for b in BLOCKS:
        if b.mark != MarkKind.FILE:
            continue
        if b.arg in seen and seen[b.arg].text != b.text:
            pytest.fail(f"{b.where}: {b.arg} differs from the one at {seen[b.arg].where}")
        seen[b.arg] = b
        (dest / b.arg).write_text(b.text)


@pytest.fixture(scope="module")
def checkout(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Checkout]:
    root = tmp_path_factory.mktemp("docs")
    work = root / "checkout"
    shutil.copytree(REPO / "configs", work / "configs")
    shutil.copytree(tiny_model, work / "build" / "models" / "tiny-llama")
    write_files(work)
    serve = ServeProcess(work / "pcm-state", "--heartbeat-interval", "1").start()
    with (root / "worker.log").open("ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pcm_service.cli", "worker", "--service", serve.url, "--token-file",
             str(serve.pool_token_file), "--work-dir", str(root / "worker"), "--idle-timeout", "600"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PCM_SERVICE_URL=serve.url,
               NO_PROXY="127.0.0.1,localhost", PYTHONPATH=str(REPO))
    try:
        yield Checkout(work, serve, env)
    finally:
        worker.terminate()
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
        serve.stop()


def run_block(b: Block, where: Checkout) -> subprocess.CompletedProcess[str]:
    if b.lang in PYTHON:
        argv = [sys.executable, "-c", b.text]
    else:
        assert b.lang in SHELL
        argv = ["bash", "-euo", "pipefail", "-c", "\n".join(shell_lines(b)) if b.lang == "console" else b.text]
    try:
        return subprocess.run(argv, cwd=where.dir, env=where.env, capture_output=True, text=True,
                              timeout=SNIPPET_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{b.where}: the {b.lang} snippet ran past {SNIPPET_TIMEOUT} s:\n{b.text}--- output ---\n{out}")


@pytest.mark.engine
@pytest.mark.parametrize("block", RUN, ids=[b.where for b in RUN])
def test_snippet_runs(block: Block, checkout: Checkout) -> None:
    r = run_block(block, checkout)
    if r.returncode != 0:
        output = (r.stdout + r.stderr)[-4000:]
        pytest.fail(f"{block.where}: the {block.lang} snippet exited {r.returncode}:\n{block.text}"
                    f"--- output ---\n{output}", pytrace=False)


def scrape(serve: ServeProcess) -> str:
    r = httpx.get(f"{serve.url}/metrics", headers={"Authorization": f"Bearer {serve.metrics_token}"}, timeout=10)
    r.raise_for_status()
    return r.text


def series(exposition: str) -> set[str]:
    """Series names as a scrape shows them (a counter with its ``_total``)."""
    out = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        if name.endswith("_created"):  # a histogram's creation time, beside the histogram
            continue
        out.add(f"{name}_total" if kind == "counter" and not name.endswith("_total") else name)
    return out


@pytest.mark.engine
def test_the_snippets_started_one_engine_and_the_metrics_page_lists_what_is_served(checkout: Checkout) -> None:
    from prometheus_client import generate_latest

    from factory.metrics import FactoryMetrics

    text = scrape(checkout.serve)
    starts = re.search(r"^pcm_engine_starts_total (\S+)$", text, re.M)
    # one context for every workload the docs submit (the tour's model and engine settings):
    # a second engine start would cost ~30 s and means a snippet drifted from them
    assert starts is not None and float(starts[1]) <= 1, starts
    served = series(text)
    factory = series(generate_latest(FactoryMetrics("docs").registry).decode())
    prose = "\n".join(line for _, line in PARSED["docs/watching.md"][2])  # outside the fences
    listed = {m for span in re.findall(r"`([^`\n]+)`", prose) for m in re.findall(r"\bpcm_[a-z_]+", span)}
    assert served - listed == set(), f"served but not in docs/watching.md: {sorted(served - listed)}"
    unknown = listed - served - factory
    assert unknown == set(), f"in docs/watching.md but not served: {sorted(unknown)}"

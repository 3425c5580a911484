"""What every `pcm` subcommand shares: consoles, the --service and --token-file options,
finding the API token, failing clearly."""
from __future__ import annotations

import logging
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from pcm_service.client import ServiceClient, ServiceError, default_service_url
from pcm_service.protocol import EngineSettings, RowIn, WorkloadHeader, WorkloadStatus, WorkloadSubmission
from pcm_service.tls import CA_FILE_ENV
from pcm_service.tokens import API, Token, TokenError, client_token
from pcm_service.workload import WorkloadError, load_batch_file, load_workload_stream, whole

if TYPE_CHECKING:
    from factory.drill import EvictionSettings

console = Console(stderr=True)
out = Console()

ServiceOpt = typer.Option(None, "--service", "-s", help="Service URL [env PCM_SERVICE_URL]")
TokenFileOpt = typer.Option(
    None, "--token-file", envvar=API.file_env,
    help=f"File holding the service's API token [env {API.file_env}; else env {API.value_env},"
         f" else ./pcm-state/{API.filename} if there]")

CaFileOpt = typer.Option(
    None, "--ca-file", envvar=CA_FILE_ENV,
    help=f"CA certificate(s) that sign the service's TLS certificate [env {CA_FILE_ENV}; else the"
         " system store] (for an https:// service)")


# C0 and C1 controls, DEL, and the invisible format characters that reorder or hide text (bidi
# overrides and isolates, zero-width spaces, line and paragraph separators, the BOM)
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def printable(value: object) -> str:
    """``value`` as text with every control character written out as its escape (ESC → ``\\x1b``):
    a string a worker sent (its host, GPU names, errors) cannot retitle, clear or recolour the
    terminal, nor hide or reorder what is shown around it."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))


def plain(value: object) -> Text:
    """``printable(value)`` as a Rich Text: printed as it is, never read as markup (``[red]``,
    ``[link=…]``) or emoji codes. Every table cell and line of `pcm status` goes through this."""
    return Text(printable(value))


def fail(msg: str, code: int = 1) -> NoReturn:
    console.print(f"[red]error:[/red] {msg}", highlight=False)
    raise typer.Exit(code)


def token_from(path: Optional[Path], flag: str) -> Optional[str]:
    """The token in ``path`` (None without one); an unreadable or empty file exits 2."""
    from pcm_service.tokens import read_token

    try:
        return read_token(path) if path else None
    except TokenError as e:
        fail(f"{flag}: {e}", code=2)


class UserClient(ServiceClient):
    """A client with the API token that turns the service's 401/403 into what to do next."""

    def __init__(self, url: str, token: Optional[Token], **kw: Any) -> None:
        super().__init__(url, token=token.value if token else None, **kw)
        self.token_source = token.source if token else None

    def request(self, *args: Any, **kw: Any) -> Any:
        with self._auth_hints():
            return super().request(*args, **kw)

    def submit_stream(self, *args: Any, **kw: Any) -> Any:
        with self._auth_hints():
            return super().submit_stream(*args, **kw)

    @contextmanager
    def _auth_hints(self) -> Iterator[None]:
        try:
            yield
        except ServiceError as e:
            if e.status not in (401, 403):
                raise
            raise ServiceError(e.status, auth_hint(e.status, self.url, self.token_source)) from None


def auth_hint(status: int, url: str, source: Optional[str]) -> str:
    fix = (f"pass --token-file STATE_DIR/{API.filename} (STATE_DIR: the --state-dir of that"
           f" `pcm serve`) or set {API.file_env}")
    if status == 401 or source is None:
        return f"the service at {url} wants its API token: {fix}"
    return f"the service at {url} refused the API token from {source}: {fix}"


def client_for(service: Optional[str], token_file: Optional[Path] = None, ca_file: Optional[Path] = None,
               **kw: float) -> UserClient:
    """A client for the user routes; the API token: --token-file, $PCM_API_TOKEN_FILE,
    $PCM_API_TOKEN, ./pcm-state/api.token (none found: the service's 401 says what to do)."""
    from pcm_service.tls import TLSError

    try:
        token = client_token(API, token_file)
    except TokenError as e:
        fail(f"API token: {e}", code=2)
    try:
        return UserClient(service or default_service_url(), token, ca_file=ca_file, **kw)
    except TLSError as e:
        fail(f"--ca-file: {e}", code=2)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise


EvictEveryOpt = typer.Option(None, min=0.1, help="Eviction drill: evict a random warm worker every this many seconds")
EvictSignalOpt = typer.Option("kill", help="Eviction drill: kill (SIGKILL) or term (vacate)")
EvictCountOpt = typer.Option(None, min=1, help="Eviction drill: stop after this many")


def eviction_settings(every: Optional[float], signal: str, count: Optional[int],
                      seed: Optional[int]) -> Optional["EvictionSettings"]:
    """The eviction drill from --evict-every/--evict-signal/--evict-count/--seed (None: off)."""
    from factory.drill import EvictionSettings

    if signal not in ("kill", "term"):
        fail(f"--evict-signal: {signal!r} is not one of kill, term", code=2)
    if every is None:
        if count is not None:
            fail("--evict-count needs --evict-every", code=2)
        return None
    return EvictionSettings(interval=every, signal="kill" if signal == "kill" else "term", count=count, seed=seed)


ModelOpt = typer.Option(None, "--model", help="For an OpenAI batch file (.jsonl): a registered model's"
                        " name, or a model directory (default: the lines' body.model)")
EngineArgOpt = typer.Option([], "--engine-arg", help="vLLM engine argument KEY=VALUE (repeatable)")
BatchSizeOpt = typer.Option(16, min=1, help="For an OpenAI batch file: rows per leased batch")
OutputOpt = typer.Option(None, "--output", help="For an OpenAI batch file: the output file (default:"
                         " <name>.output.jsonl beside it; failed requests go to <name>.errors.jsonl)")


def engine_settings(args: list[str]) -> EngineSettings:
    """``--engine-arg KEY=VALUE`` → EngineSettings; values read as YAML scalars (1, 0.5, true)."""
    import yaml

    values: dict[str, Any] = {}
    for a in args:
        key, eq, raw = a.partition("=")
        if not eq or not key:
            fail(f"--engine-arg {a!r}: expected KEY=VALUE, e.g. --engine-arg dtype=float32", code=2)
        values[key.replace("-", "_")] = yaml.safe_load(raw)
    known = set(EngineSettings.model_fields) - {"extra"}
    try:
        return EngineSettings.model_validate({**{k: v for k, v in values.items() if k in known},
                                              "extra": {k: v for k, v in values.items() if k not in known}})
    except ValidationError as e:
        err = e.errors()[0]
        fail(f"--engine-arg {err['loc'][0]}: {err['msg']}", code=2)


def load_workload_stream_file(path: Path, model: Optional[str] = None, engine_args: Optional[list[str]] = None,
                              batch_size: int = 16, output: Optional[Path] = None
                              ) -> tuple[WorkloadHeader, Iterator[RowIn]]:
    """A workload YAML file, or an OpenAI Batch input file (``.jsonl``), and its rows, read as
    they are consumed; exit 2 naming the field of the first problem found before any row."""
    try:
        if path.suffix == ".jsonl":
            return load_batch_file(path, model, engine_settings(engine_args or []), batch_size, output)
        if model is not None or engine_args:
            fail(f"{path}: --model and --engine-arg are for OpenAI batch files (.jsonl); a workload"
                 " file names its model and engine itself", code=2)
        return load_workload_stream(path)
    except WorkloadError as e:
        fail(f"{path}: {e}", code=2)


def load_workload_file(path: Path, model: Optional[str] = None, engine_args: Optional[list[str]] = None,
                       batch_size: int = 16, output: Optional[Path] = None) -> WorkloadSubmission:
    """The same with every row read: exit 2 naming the field (and line) of the first problem,
    before anything is submitted."""
    header, rows = load_workload_stream_file(path, model, engine_args, batch_size, output)
    try:
        return whole(header, rows)
    except WorkloadError as e:
        fail(f"{path}: {e}", code=2)


def progress_bar():  # type: ignore[no-untyped-def]
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]:.1f} rows/s"), TimeElapsedColumn(), console=console)


@contextmanager
def sending_progress(label: str) -> Iterator[Callable[[int], None]]:
    """Rows sent so far and their rate, while a submission streams to the service."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    t0 = time.monotonic()
    with Progress(SpinnerColumn(), TextColumn("{task.description}: {task.completed:,.0f} rows sent"),
                  TextColumn("{task.fields[rate]:,.0f} rows/s"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task(f"submitting {label}", total=None, rate=0.0)

        def sent(n: int) -> None:
            bar.update(task, completed=n, rate=n / max(time.monotonic() - t0, 1e-6))

        yield sent


def progress_until_done(fetch, total: int, label: str) -> WorkloadStatus:  # type: ignore[no-untyped-def]
    with progress_bar() as bar:
        task = bar.add_task(label, total=total, rate=0.0)
        while True:
            st = fetch()
            bar.update(task, completed=st.rows_done, rate=st.rows_per_second)
            if st.state.value == "completed":
                return st


def report_done(st: WorkloadStatus) -> None:
    failed = f", [yellow]{st.rows_failed} failed[/yellow]" if st.rows_failed else ""
    console.print(f"[green]done:[/green] {st.rows_done} rows{failed}; results in {st.output}",
                  highlight=False)
    out.print(st.output, highlight=False)

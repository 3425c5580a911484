"""What every `pcm` subcommand shares: consoles, the --service option, failing clearly."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console

from pcm_service.client import ServiceClient, default_service_url

console = Console(stderr=True)
out = Console()

ServiceOpt = typer.Option(None, "--service", "-s", help="Service URL [env PCM_SERVICE_URL]")


def fail(msg: str, code: int = 1) -> NoReturn:
    console.print(f"[red]error:[/red] {msg}", highlight=False)
    raise typer.Exit(code)


def token_from(path: Optional[Path], flag: str) -> Optional[str]:
    """The token in ``path`` (None without one); an unreadable or empty file exits 2."""
    from pcm_service.tokens import TokenError, read_token

    try:
        return read_token(path) if path else None
    except TokenError as e:
        fail(f"{flag}: {e}", code=2)


def client_for(service: Optional[str], **kw: float) -> ServiceClient:
    return ServiceClient(service or default_service_url(), **kw)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise

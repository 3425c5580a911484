"""The `pcm` command line, one module per command group: ``serve``, ``jobs`` (submit,
status), ``run`` (one machine: ``embedded``), ``factory``, ``worker``, ``setup`` (model
make-tiny, tls init); ``common`` holds what they share. Commands import what they drive
(the core, the factory, the worker) inside their bodies, so `pcm status` loads no engine.
This package is the only part of pcm_service that may import ``factory`` or ``worker_image``.
"""
from __future__ import annotations

import typer

from pcm_service.cli import envpack, jobs, models, run, serve, setup, worker
from pcm_service.cli.factory import factory_app

app = typer.Typer(help="PCM: throughput LLM inference on opportunistic HTCondor GPU slots.",
                  no_args_is_help=True, add_completion=False)
app.command()(serve.serve)
app.command()(jobs.submit)
app.command()(jobs.status)
app.command()(jobs.report)
app.command()(run.run)
app.command()(worker.worker)
app.add_typer(factory_app, name="factory")
model_app = typer.Typer(help="Models: served by name (add, list), and local test/demo models.",
                        no_args_is_help=True)
model_app.command("make-tiny")(setup.make_tiny)
model_app.command("fetch-demo")(setup.fetch_demo)
model_app.command("add")(models.add)
model_app.command("list")(models.list_models)
app.add_typer(model_app, name="model")
tls_app = typer.Typer(help="TLS for the service's API.", no_args_is_help=True)
tls_app.command("init")(setup.tls_init)
app.add_typer(tls_app, name="tls")
env_app = typer.Typer(help="The worker environment, packed and shipped to glideins like the weights.",
                      no_args_is_help=True)
env_app.command("pack")(envpack.pack_command)
app.add_typer(env_app, name="env")


def main() -> None:
    app()

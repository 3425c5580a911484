"""`pcm model add` and `pcm model list`: the models a service serves by name."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pcm_service.cli.common import (
    CaFileOpt,
    EngineArgOpt,
    ServiceOpt,
    TokenFileOpt,
    client_for,
    console,
    engine_settings,
    fail,
)
from pcm_service.client import ServiceError
from pcm_service.protocol import NamedModel

SERVED = "/served-models"


def add(name: str = typer.Argument(..., help="The name OpenAI lines select it by (body.model)"),
        model_dir: Path = typer.Argument(..., help="Its model directory, under one of the service's --model-root"),
        engine_arg: list[str] = EngineArgOpt,
        service: Optional[str] = ServiceOpt, token_file: Optional[Path] = TokenFileOpt,
        ca_file: Optional[Path] = CaFileOpt) -> None:
    """Serve a model directory by name (replaces a model of that name)."""
    model = NamedModel(name=name, path=str(model_dir.resolve()), engine=engine_settings(engine_arg))
    try:
        added = client_for(service, token_file, ca_file).request("POST", SERVED, model, NamedModel)
    except ServiceError as e:
        fail(e.detail, code=2 if 400 <= e.status < 500 else 1)
    console.print(f"model {added.name} → {added.path}", highlight=False)


def list_models(service: Optional[str] = ServiceOpt, token_file: Optional[Path] = TokenFileOpt,
                ca_file: Optional[Path] = CaFileOpt) -> None:
    """The models the service serves by name: name, directory and engine settings (JSON), tab-separated."""
    from pydantic import TypeAdapter

    try:
        raw = client_for(service, token_file, ca_file).request("GET", SERVED)
    except ServiceError as e:
        fail(e.detail)
    for m in TypeAdapter(list[NamedModel]).validate_python(raw):  # one tab-separated line each
        typer.echo(f"{m.name}\t{m.path}\t{m.engine.model_dump_json(exclude_defaults=True)}")

"""The workload file: YAML the user writes, validated and turned into a submission.

All checks happen here, before anything reaches the service, so a bad file is
rejected with a message naming the field and nothing is submitted.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Optional

from pydantic import Field, model_validator

from pcm_service.protocol import (
    ContextSpec,
    EngineSettings,
    RowIn,
    SamplingSettings,
    Strict,
    WorkloadSubmission,
)
from pcm_service.yamlmodel import FieldError, load_yaml_model


class WorkloadError(FieldError):
    """A workload file problem; ``field`` is the dotted path of the offending key."""


class InputSpec(Strict):
    path: str
    prompt_field: Optional[str] = None
    template: Optional[str] = None
    id_field: Optional[str] = None

    @model_validator(mode="after")
    def _one_prompt_source(self) -> "InputSpec":
        if (self.prompt_field is None) == (self.template is None):
            raise ValueError("give exactly one of prompt_field or template")
        return self


class WorkloadFile(Strict):
    name: str = Field(min_length=1)
    model: str
    engine: EngineSettings = Field(default_factory=EngineSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    inputs: InputSpec
    batch_size: int = Field(gt=0)
    output: str = Field(min_length=1)


def _template_fields(template: str) -> list[str]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise WorkloadError("inputs.template", f"invalid template: {e}") from None
    for name in names:
        if not name.isidentifier():
            raise WorkloadError("inputs.template", f"placeholder {{{name}}} must be a plain field name")
    return names


def read_rows(spec: InputSpec, path: Path) -> list[RowIn]:
    """Read the JSONL inputs and render each row's prompt, in file order."""
    fields = _template_fields(spec.template) if spec.template is not None else []
    rows: list[RowIn] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise WorkloadError("inputs.path", f"{where} is not valid JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise WorkloadError("inputs.path", f"{where} must be a JSON object")
            if spec.template is not None:
                missing = [f for f in fields if f not in obj]
                if missing:
                    raise WorkloadError(
                        "inputs.template", f"{where} has no field {missing[0]!r} used by the template"
                    )
                prompt = spec.template.format_map({f: obj[f] for f in fields})
            else:
                assert spec.prompt_field is not None
                if spec.prompt_field not in obj:
                    raise WorkloadError("inputs.prompt_field", f"{where} has no field {spec.prompt_field!r}")
                prompt = str(obj[spec.prompt_field])
            if spec.id_field is not None:
                if spec.id_field not in obj:
                    raise WorkloadError("inputs.id_field", f"{where} has no field {spec.id_field!r}")
                row_id = str(obj[spec.id_field])
            else:
                row_id = str(obj.get("custom_id", len(rows)))
            if row_id in seen:
                raise WorkloadError("inputs.id_field", f"{where} repeats row id {row_id!r}")
            seen.add(row_id)
            rows.append(RowIn(row_id=row_id, prompt=prompt))
    if not rows:
        raise WorkloadError("inputs.path", f"{path} has no rows")
    return rows


def load_workload(path: str | Path) -> WorkloadSubmission:
    """Validate a workload file and everything it points at; paths resolve beside it."""
    wl_path = Path(path)
    wf = load_yaml_model(wl_path, WorkloadFile, WorkloadError)
    base = wl_path.resolve().parent

    model_dir = (base / wf.model).resolve()
    if not model_dir.is_dir():
        raise WorkloadError("model", f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise WorkloadError("model", f"{model_dir} has no config.json (not a Hugging Face model directory)")
    input_path = (base / wf.inputs.path).resolve()
    if not input_path.is_file():
        raise WorkloadError("inputs.path", f"input file {input_path} does not exist")
    output = (base / wf.output).resolve()
    if output.is_dir():
        raise WorkloadError("output", f"{output} is a directory; name a file")

    rows = read_rows(wf.inputs, input_path)
    context = ContextSpec(model=str(model_dir), engine=wf.engine)  # the service adds the digest
    return WorkloadSubmission(
        name=wf.name, context=context, sampling=wf.sampling,
        batch_size=wf.batch_size, output=str(output), rows=rows,
    )

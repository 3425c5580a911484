"""The workload file: YAML the user writes, validated and turned into a submission.

All checks happen here, before anything reaches the service, so a bad file is
rejected with a message naming the field and nothing is submitted.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional

from pydantic import Field, model_validator

from pcm_service.batchapi.lines import BatchFileSummary, check_batch_file, read_batch_rows
from pcm_service.protocol import (
    ChatMessage,
    ChatRole,
    ContextSpec,
    EngineSettings,
    OpenAIOutput,
    RowIn,
    SamplingSettings,
    Strict,
    WorkloadHeader,
    WorkloadSubmission,
)
from pcm_service.weights.modelpaths import has_chat_template, no_chat_template
from pcm_service.yamlmodel import FieldError, load_yaml_model


class WorkloadError(FieldError):
    """A workload file problem; ``field`` is the dotted path of the offending key."""


class MessageTemplate(Strict):
    """A chat message of every row; ``content`` may hold ``{field}`` placeholders."""

    role: ChatRole = Field(strict=False)
    content: str


class InputSpec(Strict):
    path: str
    format: Literal["pcm", "openai"] = "pcm"  # openai: an OpenAI Batch input file (JSONL)
    prompt_field: Optional[str] = None
    template: Optional[str] = None
    messages: Optional[list[MessageTemplate]] = Field(default=None, min_length=1)
    id_field: Optional[str] = None

    @model_validator(mode="after")
    def _one_prompt_source(self) -> "InputSpec":
        given = sum(x is not None for x in (self.prompt_field, self.template, self.messages))
        if self.format == "openai" and (given or self.id_field):
            raise ValueError("an OpenAI batch file carries its own requests and custom_ids:"
                             " give no prompt_field, template, messages or id_field")
        if self.format == "pcm" and given != 1:
            raise ValueError("give exactly one of prompt_field, template or messages")
        return self


class WorkloadFile(Strict):
    name: str = Field(min_length=1)
    model: str
    engine: EngineSettings = Field(default_factory=EngineSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    inputs: InputSpec
    batch_size: int = Field(gt=0)
    output: str = Field(min_length=1)
    error_output: Optional[str] = None  # OpenAI format: failed requests (default: beside output)


def _template_fields(template: str, where: str = "inputs.template") -> list[str]:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise WorkloadError(where, f"invalid template: {e}") from None
    for name in names:
        if not name.isidentifier():
            raise WorkloadError(where, f"placeholder {{{name}}} must be a plain field name")
    return names


def _fill(template: str, fields: list[str], obj: dict[str, object], where: str, field: str) -> str:
    missing = [f for f in fields if f not in obj]
    if missing:
        raise WorkloadError(field, f"{where} has no field {missing[0]!r} used by the template")
    return template.format_map({f: obj[f] for f in fields})


def iter_rows(spec: InputSpec, path: Path) -> Iterator[RowIn]:
    """Read the JSONL inputs and render each row's prompt or messages, in file order, one line
    at a time; a bad line raises WorkloadError naming it (after the rows before it were yielded)."""
    fields = _template_fields(spec.template) if spec.template is not None else []
    msg_fields = [_template_fields(m.content, f"inputs.messages[{i}].content")
                  for i, m in enumerate(spec.messages or [])]
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
            messages = None
            prompt: Optional[str] = None
            if spec.messages is not None:
                messages = [ChatMessage(role=m.role, content=_fill(m.content, f, obj, where,
                                                                   f"inputs.messages[{i}].content"))
                            for i, (m, f) in enumerate(zip(spec.messages, msg_fields, strict=True))]
            elif spec.template is not None:
                prompt = _fill(spec.template, fields, obj, where, "inputs.template")
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
                row_id = str(obj.get("custom_id", len(seen)))
            if row_id in seen:
                raise WorkloadError("inputs.id_field", f"{where} repeats row id {row_id!r}")
            seen.add(row_id)
            yield RowIn(row_id=row_id, prompt=prompt, messages=messages)
    if not seen:
        raise WorkloadError("inputs.path", f"{path} has no rows")


def read_rows(spec: InputSpec, path: Path) -> list[RowIn]:
    return list(iter_rows(spec, path))


def error_file_for(output: Path) -> Path:
    """Where failed requests go beside ``output``: x.output.jsonl → x.errors.jsonl, as OpenAI names them."""
    return output.with_name(output.stem.removesuffix(".output") + ".errors.jsonl")


def model_dir_error(model_dir: Path) -> Optional[str]:
    if not model_dir.is_dir():
        return f"model directory {model_dir} does not exist"
    if not (model_dir / "config.json").is_file():
        return f"{model_dir} has no config.json (not a Hugging Face model directory)"
    return None


def openai_rows(path: Path, field: str, defaults: Optional[SamplingSettings] = None
                ) -> tuple[BatchFileSummary, Iterator[RowIn]]:
    """An OpenAI Batch input file, checked whole first (one pass, line by line): any bad line →
    WorkloadError naming the first lines at fault (nothing is submitted); then its rows, read
    again as they are consumed."""
    summary = check_batch_file(path, defaults=defaults)
    if summary.errors:
        shown = "; ".join(str(e) for e in summary.errors[:5])
        more = f" (and {summary.error_count - 5} more)" if summary.error_count > 5 else ""
        raise WorkloadError(field, f"{shown}{more}" if field == "file" else f"{path.name} {shown}{more}")
    assert summary.endpoint is not None
    return summary, read_batch_rows(path, summary.endpoint, defaults)


def load_batch_file(path: Path, model: Optional[str], engine: EngineSettings, batch_size: int,
                    output: Optional[Path]) -> tuple[WorkloadHeader, Iterator[RowIn]]:
    """`pcm submit/run batch.jsonl --model NAME|DIR`: an OpenAI Batch input file as a workload.
    A directory is used as the model (lines keep their ``model`` name in the output); a name
    selects a model registered with the service (default: the lines' own ``model``)."""
    if not path.is_file():
        raise WorkloadError("file", f"input file {path} does not exist")
    summary, rows = openai_rows(path, "file")
    assert summary.endpoint is not None and summary.model is not None
    output = (output or path.with_name(path.stem + ".output.jsonl")).resolve()
    spec = OpenAIOutput(endpoint=summary.endpoint, model=summary.model, error_output=str(error_file_for(output)))
    context: Optional[ContextSpec] = None
    name: Optional[str] = model or summary.model
    if model is not None and Path(model).is_dir():
        model_dir = Path(model).resolve()
        problem = model_dir_error(model_dir)
        if problem:
            raise WorkloadError("--model", problem)
        if summary.has_chat and not has_chat_template(model_dir):
            raise WorkloadError("--model", no_chat_template(model_dir))
        context, name = ContextSpec(model=str(model_dir), engine=engine), None
    return WorkloadHeader(name=path.stem, context=context, model=name, sampling=SamplingSettings(),
                          batch_size=batch_size, output=str(output), openai=spec), rows


def load_workload_stream(path: str | Path) -> tuple[WorkloadHeader, Iterator[RowIn]]:
    """Validate a workload file and everything it points at (paths resolve beside it); its rows
    are read as they are consumed, a bad one raising WorkloadError naming its line."""
    wl_path = Path(path)
    wf = load_yaml_model(wl_path, WorkloadFile, WorkloadError)
    base = wl_path.resolve().parent

    model_dir = (base / wf.model).resolve()
    problem = model_dir_error(model_dir)
    if problem:
        raise WorkloadError("model", problem)
    input_path = (base / wf.inputs.path).resolve()
    if not input_path.is_file():
        raise WorkloadError("inputs.path", f"input file {input_path} does not exist")
    output = (base / wf.output).resolve()
    if output.is_dir():
        raise WorkloadError("output", f"{output} is a directory; name a file")

    openai = None
    rows: Iterator[RowIn]
    if wf.inputs.format == "openai":
        summary, rows = openai_rows(input_path, "inputs.path", wf.sampling)
        assert summary.endpoint is not None
        errors = (base / wf.error_output).resolve() if wf.error_output else error_file_for(output)
        openai = OpenAIOutput(endpoint=summary.endpoint, model=summary.model, error_output=str(errors))
        chat = summary.has_chat
    else:
        rows = iter_rows(wf.inputs, input_path)
        chat = wf.inputs.messages is not None
    if chat and not has_chat_template(model_dir):
        raise WorkloadError("model", no_chat_template(model_dir))
    context = ContextSpec(model=str(model_dir), engine=wf.engine)  # the service adds the digest
    return WorkloadHeader(name=wf.name, context=context, sampling=wf.sampling, batch_size=wf.batch_size,
                          output=str(output), openai=openai), rows


def whole(header: WorkloadHeader, rows: Iterable[RowIn]) -> WorkloadSubmission:
    """A submission with every row in it (one JSON body, or a `pcm run` in one process)."""
    return WorkloadSubmission(**{f: getattr(header, f) for f in WorkloadHeader.model_fields}, rows=list(rows))


def load_workload(path: str | Path) -> WorkloadSubmission:
    """A workload file with all its rows read: every line checked before anything is submitted."""
    return whole(*load_workload_stream(path))

"""YAML files the user writes (workloads, factory configs) parsed into pydantic models,
with one error type that names the offending field."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class FieldError(ValueError):
    """A problem in a user file; ``field`` is the dotted path of the offending key."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def field_path(err: Mapping[str, Any]) -> str:
    return ".".join(str(p) for p in err["loc"]) or "(top level)"


def problem(err: Mapping[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "missing":
        return "required field is missing"
    return err["msg"].removeprefix("Value error, ")


def parse_yaml_model(text: str, model: type[M], source: str, error: type[FieldError] = FieldError) -> M:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error("(yaml)", f"{source} is not valid YAML{where}: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error("(top level)", f"{source} must be a YAML mapping of fields")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise error(field_path(first), problem(first)) from None


def load_yaml_model(path: Path, model: type[M], error: type[FieldError] = FieldError) -> M:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise error("(file)", f"cannot read {path}: {e.strerror}") from None
    return parse_yaml_model(text, model, str(path), error)

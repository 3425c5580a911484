"""MkDocs hooks: the reference tables are generated from the code at build time, so they cannot
drift from it. A page holds a marker (``<!-- generated: cli-reference -->``) and the build puts
the table there: the workload file's and factory.yaml's fields from their pydantic models, with
the human descriptions in ``docs/*-fields.yaml``, and every `pcm` command from the typer app.
A model field without a description, a description naming no field, or a marker missing from
the pages fails the build (and so `make docs`, and so `make test`)."""
from __future__ import annotations

import enum
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
INT_MAX = 2**53 - 1  # pcm_service.protocol.base's bound on every integer: not worth printing


class DocsError(Exception):
    """What fails the build (raised as mkdocs' PluginError by the hooks)."""


# ----- model fields -----------------------------------------------------------------------


@dataclass(frozen=True)
class FieldDoc:
    """One field of a file format: its dotted path (``inputs.messages[].role``) and what to print."""

    path: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class Section:
    """The fields of one model of the tree (the top level, ``engine``, ``inputs.messages[]``, ...)."""

    path: str
    title: str
    fields: list[FieldDoc]


def _submodel(annotation: Any) -> tuple[Optional[type[BaseModel]], bool]:
    """The model a field holds (unwrapping Optional and list) and whether it is a list of them."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = get_origin(annotation)
    if origin is Union or str(origin) == "types.UnionType":
        for arg in get_args(annotation):
            model, many = _submodel(arg)
            if model is not None:
                return model, many
    if origin is list:
        model, _ = _submodel(get_args(annotation)[0])
        return model, True
    return None, False


def _deref(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _bounds(s: dict[str, Any]) -> list[str]:
    out = []
    if "exclusiveMinimum" in s:
        out.append(f"> {s['exclusiveMinimum']:g}")
    if "minimum" in s and s["minimum"] > -INT_MAX:
        out.append(f"≥ {s['minimum']:g}")
    if "maximum" in s and s["maximum"] < INT_MAX:
        out.append(f"≤ {s['maximum']:g}")
    if s.get("minLength"):
        out.append("not empty")
    if s.get("minItems"):
        out.append(f"at least {s['minItems']}")
    return out


def _type(s: dict[str, Any], defs: dict[str, Any], sub: Optional[str] = None) -> str:
    """A JSON schema (pydantic's) as a short type: ``integer > 0``, ``list of string``, ..."""
    if "anyOf" in s:
        parts = [_type(x, defs, sub) for x in s["anyOf"] if x.get("type") != "null"]
        return " or ".join(parts)
    if "$ref" in s and sub is not None:
        return f"mapping ([`{sub}`](#{anchor(sub)}))"
    s = _deref(s, defs)
    if "enum" in s:
        return "one of " + ", ".join(f"`{v}`" for v in s["enum"])
    kind = s.get("type", "any")
    if kind == "array":
        items = _type(s.get("items", {}), defs, sub)
        return f"list of {items}" + "".join(f", {b}" for b in _bounds(s))
    if kind == "object":
        return "mapping"
    bounds = _bounds(s)
    return f"{kind}, {' and '.join(bounds)}" if bounds else kind


def _default(info: Any) -> str:
    if info.is_required():
        return "required"
    factory = info.default_factory
    if factory is not None:
        if factory in (list, dict):
            return f"`{json.dumps(factory())}`"
        if inspect.isclass(factory) and issubclass(factory, BaseModel):
            return "its fields' defaults"
        return "see its description"  # computed where it runs (the host name, an env variable)
    value = info.default
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str) and value.startswith(f"{REPO}/"):  # a file of PCM's own, where it is installed
        return f"PCM's `{value.removeprefix(f'{REPO}/')}`"
    return f"`{json.dumps(value)}`"


def anchor(path: str) -> str:
    """The id of a section's heading: ``inputs.messages[]`` → ``inputs-messages``."""
    return "fields-" + ("-".join(p for p in path.replace("[]", "").split(".")) or "top")


def sections(model: type[BaseModel], descriptions: dict[str, str]) -> list[Section]:
    """Every model of the tree under ``model``, depth first, with its fields described."""
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    out: list[Section] = []

    def walk(m: type[BaseModel], s: dict[str, Any], prefix: str) -> None:
        rows: list[FieldDoc] = []
        below: list[tuple[type[BaseModel], dict[str, Any], str]] = []
        props = _deref(s, defs)["properties"]
        for name, info in m.model_fields.items():
            path = f"{prefix}{name}"
            sub, many = _submodel(info.annotation)
            subpath = f"{path}[]" if many else path
            prop = props[name]
            rows.append(FieldDoc(path, _type(prop, defs, subpath if sub else None), _default(info),
                                 descriptions.get(path, "")))
            if sub is not None:
                sub_schema = next((x for x in prop.get("anyOf", [prop]) if x.get("type") != "null"), prop)
                below.append((sub, sub_schema.get("items", sub_schema), subpath))
        out.append(Section(prefix.rstrip("."), m.__name__, rows))
        for sub, sub_schema, subpath in below:
            walk(sub, sub_schema, f"{subpath}.")

    walk(model, schema, "")
    return out


def field_paths(model: type[BaseModel]) -> list[str]:
    """Every field's dotted path, as the descriptions file names them."""
    return [f.path for sec in sections(model, {}) for f in sec.fields]


def load_descriptions(model: type[BaseModel], file: Path) -> dict[str, str]:
    """The descriptions file, checked against the model: one description for every field, none
    for a field the model lacks (a renamed or removed field fails the build)."""
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DocsError(f"docs/{file.name}: {e}") from None
    if not isinstance(raw, dict):
        raise DocsError(f"{file.name}: expected a mapping of field path to description")
    described = {str(k): str(v).strip() for k, v in raw.items()}
    paths = field_paths(model)
    missing = [p for p in paths if not described.get(p)]
    unknown = [p for p in described if p not in paths]
    problems = [f"{model.__name__} field {p!r} has no description in docs/{file.name}" for p in missing]
    problems += [f"docs/{file.name} describes {p!r}, which is no field of {model.__name__}" for p in unknown]
    if problems:
        raise DocsError("; ".join(problems))
    return described


def _cell(text: str) -> str:
    """One table cell: on one line, its pipes escaped outside code spans (inside, a table leaves them)."""
    parts = " ".join(text.split()).split("`")
    return "`".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def render_fields(model: type[BaseModel], file: Path, root: str) -> str:
    """Markdown tables of every field of ``model``, one section per nested model."""
    out = []
    for sec in sections(model, load_descriptions(model, file)):
        title = f"`{sec.path}`" if sec.path else root
        out.append(f"### {title} {{#{anchor(sec.path)}}}\n")
        out.append("| field | type | default | what it does |\n| --- | --- | --- | --- |")
        for f in sec.fields:
            name = f.path[len(sec.path) + 1:] if sec.path else f.path
            out.append(f"| `{name}` | {_cell(f.type)} | {_cell(f.default)} | {_cell(f.description)} |")
        out.append("")
    return "\n".join(out)


def workload_reference() -> str:
    from pcm_service.workload import WorkloadFile

    return render_fields(WorkloadFile, DOCS / "workload-fields.yaml", "Top level")


def factory_reference() -> str:
    from factory.config import FactoryConfig

    return render_fields(FactoryConfig, DOCS / "factory-fields.yaml", "Top level")


# ----- the CLI ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One `pcm` command (a leaf or a group) with its click object and context."""

    path: tuple[str, ...]
    command: Any
    context: Any

    @property
    def is_group(self) -> bool:
        return hasattr(self.command, "commands")

    @property
    def options(self) -> set[str]:
        """Every spelling of every option, ``--help`` included."""
        names = {"--help"}
        for p in self.command.params:
            if p.param_type_name == "option":
                names.update(p.opts)
                names.update(p.secondary_opts)
        return names


def cli_commands() -> Iterator[Command]:
    """The `pcm` command tree, depth first in the order `pcm --help` lists it (the root first)."""
    import typer
    from typer.main import get_command

    from pcm_service.cli import app

    root = get_command(app)

    def walk(cmd: Any, ctx: Any, path: tuple[str, ...]) -> Iterator[Command]:
        yield Command(path, cmd, ctx)
        if hasattr(cmd, "commands"):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not getattr(sub, "hidden", False):
                    yield from walk(sub, typer.Context(sub, info_name=name, parent=ctx), (*path, name))

    yield from walk(root, typer.Context(root, info_name="pcm"), ())


def _html(text: str) -> str:
    """Help text as a cell: ``<name>`` is text, not an HTML tag, outside code spans."""
    parts = _cell(text).split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def _usage(c: Command) -> str:
    return " ".join(["pcm", *c.path, *c.command.collect_usage_pieces(c.context)])


def render_command(c: Command) -> str:
    name = " ".join(("pcm", *c.path))
    out = [f"## `{name}` {{#{'-'.join(('pcm', *c.path))}}}\n", inspect.cleandoc(c.command.help or ""), "",
           f"```text\n{_usage(c)}\n```\n"]
    if c.is_group:
        out.append("| command | what it does |\n| --- | --- |")
        for sub in c.command.list_commands(c.context):
            cmd = c.command.get_command(c.context, sub)
            first = inspect.cleandoc(cmd.help or "").split("\n\n")[0]
            out.append(f"| [`{name} {sub}`](#{'-'.join(('pcm', *c.path, sub))}) | {_html(first)} |")
        out.append("")
        return "\n".join(out)
    rows = []
    for p in c.command.params:
        if getattr(p, "hidden", False):
            continue
        record = p.get_help_record(c.context)
        if record is None:
            continue
        decl, text = record
        if p.param_type_name == "argument":
            decl = p.name.upper()
        decl = decl.replace("<list[Path]>", "<path>").replace("<list[str]>", "<str>")
        repeat = " (repeatable)" if p.multiple and "repeatable" not in text else ""
        rows.append(f"| `{_cell(decl)}` | {_html(text)}{repeat} |")
    if rows:
        out.append("| argument or option | what it does |\n| --- | --- |")
        out.extend(rows)
        out.append("")
    return "\n".join(out)


def cli_reference() -> str:
    return "\n".join(render_command(c) for c in cli_commands())


# ----- the hooks --------------------------------------------------------------------------

GENERATED: dict[str, Callable[[], str]] = {
    "workload-reference": workload_reference,
    "factory-reference": factory_reference,
    "cli-reference": cli_reference,
}
_used: dict[str, str] = {}


def _marker(name: str) -> str:
    return f"<!-- generated: {name} -->"


def on_pre_build(config: Any) -> None:
    """Check the descriptions before any page is read: a missing one fails even a draft build."""
    from mkdocs.exceptions import PluginError

    _used.clear()
    try:
        for render in GENERATED.values():
            render()
    except DocsError as e:
        raise PluginError(str(e)) from None


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    from mkdocs.exceptions import PluginError

    for name, render in GENERATED.items():
        if _marker(name) in markdown:
            if name in _used:
                raise PluginError(f"{_marker(name)} is in {_used[name]} and in {page.file.src_path}")
            _used[name] = page.file.src_path
            try:
                markdown = markdown.replace(_marker(name), render())
            except DocsError as e:
                raise PluginError(str(e)) from None
    return markdown


def on_post_build(config: Any) -> None:
    from mkdocs.exceptions import PluginError

    missing = [_marker(n) for n in GENERATED if n not in _used]
    if missing:
        raise PluginError(f"no page holds {', '.join(missing)}: the generated reference would be missing")

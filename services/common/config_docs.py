"""The configuration reference, docs/configuration.md: its tables generated from the settings classes.

    python -m opd.common.config_docs --write docs/configuration.md   # regenerate the tables in place
    python -m opd.common.config_docs --check docs/configuration.md   # exit 1 with a diff when the page drifts

Each table sits between `<!-- BEGIN generated: NAME -->` and `<!-- END generated: NAME -->`; the prose
around them is hand-written and kept. A service's table, `variable | flag | default | meaning`, has a row
per settings field: its env variable (`OPD_API_KEY` for the shared key) and the `serve` option of the same
name. The run config's and the stack file's, `field | type | default | meaning`, flatten nested sections to
dotted paths (`student.lora.rank`, `teachers.<name>.urls`); a section class met again names its first path.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AliasChoices, BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

PAGE = Path("docs/configuration.md")
MARKER = re.compile(r"(<!-- BEGIN generated: ([\w.]+) -->\n)(.*?)(<!-- END generated: \2 -->)", re.S)
Row = tuple[str, str, str, str]


def cell(text: str) -> str:
    """A table cell: `|` escaped, and `<` outside code spans, so that `<name>` is not taken for an HTML tag."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


def table(header: tuple[str, ...], rows: list[Row]) -> str:
    lines = [header, tuple("---" for _ in header), *rows]
    return "".join("| " + " | ".join(cell(c) for c in line) + " |\n" for line in lines)


def show_type(tp: Any) -> str:
    """`int`, `list[str]`, `` `a` | `b` `` for a Literal; None left out of a union (the default says unset)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return show_type(args[0])
    if origin is Literal:
        return " | ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(show_type(a) for a in args if a is not type(None))
    if origin in (tuple, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return "[" + ", ".join(show_type(a) for a in args) + "]"
        return f"list[{show_type(args[0])}]"
    if origin is dict:
        return f"dict[{show_type(args[0])}, {show_type(args[1])}]"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "{" + ", ".join(tp.model_fields) + "}"
    return "any" if tp is Any else getattr(tp, "__name__", str(tp))


def show_default(name: str, field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    if value == "" or isinstance(value, BaseModel):
        return "—"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and name.endswith("_bytes") and value % 2**20 == 0:
        return f"`{value}` ({value >> 20} MiB)"
    if isinstance(value, (tuple, list, dict)):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def section_of(tp: Any) -> tuple[type[BaseModel], str] | None:
    """The section class a field holds: (cls, '') for one (or none), (cls, '.<name>') for a dict of them."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return section_of(args[0])
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return section_of(next(a for a in args if a is not type(None)))
    if origin is dict and (inner := section_of(args[1])) is not None and not inner[1]:
        return inner[0], ".<name>"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp, ""
    return None


def field_rows(model: type[BaseModel], prefix: str = "", seen: dict | None = None) -> list[Row]:
    """`field | type | default | meaning` rows; plain sections are walked before dicts of them, which refer back."""
    seen = {} if seen is None else seen
    sections = {name: section_of(field.annotation) for name, field in model.model_fields.items()}
    rows: dict[str, list[Row]] = {}
    for name in sorted(sections, key=lambda n: bool(sections[n] and sections[n][1])):  # type: ignore[index]
        field, path, section = model.model_fields[name], prefix + name, sections[name]
        meaning = field.description or ""
        if section is None:
            rows[name] = [(f"`{path}`", show_type(field.annotation), show_default(name, field), meaning)]
            continue
        cls, key = section
        kind = show_type(field.annotation) if key else "section"
        if cls in seen:
            rows[name] = [(f"`{path}`", kind, show_default(name, field), f"{meaning} Fields as `{seen[cls]}.*`.".strip())]
            continue
        seen[cls] = path + key
        own = [(f"`{path}`", kind, show_default(name, field), meaning)] if key or meaning else []
        rows[name] = own + field_rows(cls, f"{path}{key}.", seen)
    return [row for name in model.model_fields for row in rows[name]]


def section_tables(model: type[BaseModel], name: str) -> dict[str, str]:
    """One table of the model's own fields (`name`), and one per section (`name.<section>`)."""
    groups: dict[str, list[Row]] = {name: []}
    for row in field_rows(model):
        head, dot, _ = row[0].strip("`").partition(".")
        groups.setdefault(f"{name}.{head}" if dot else name, []).append(row)
    return {key: table(("field", "type", "default", "meaning"), rows) for key, rows in groups.items()}


def serve_flags(service: str) -> dict[str, list[str]]:
    """The options of `opd <service> serve`, by parameter name (`enable_lora`: `--enable-lora`, `--no-lora`)."""
    import typer.main

    command = typer.main.get_command(importlib.import_module(f"opd.{service}.cli").app)
    command = getattr(command, "commands", {}).get("serve", command)
    return {p.name: [*p.opts, *p.secondary_opts] for p in command.params if p.name}


def service_table(settings: type[BaseModel], flags: dict[str, list[str]]) -> str:
    """`variable | flag | default | meaning`, a row per field of a pydantic-settings class."""
    prefix = settings.model_config.get("env_prefix", "")
    rows = []
    for name, field in settings.model_fields.items():
        alias = field.validation_alias
        names = alias.choices if isinstance(alias, AliasChoices) else [alias]
        variable = next((a for a in names if isinstance(a, str)), prefix + name.upper())
        flag = " / ".join(f"`{f}`" for f in flags.get(name, [])) or "—"
        rows.append((f"`{variable}`", flag, show_default(name, field), field.description or ""))
    return table(("variable", "flag", "default", "meaning"), rows)


def all_tables() -> dict[str, str]:
    """Every generated table by its marker name: teacher, student, trainer, run, run.<section>, stack."""
    from opd.common import settings
    from opd.trainer.config import RunConfig
    from opd.up.config import StackConfig

    services = {"teacher": settings.TeacherSettings, "student": settings.StudentSettings, "trainer": settings.TrainerSettings}
    out = {name: service_table(cls, serve_flags(name)) for name, cls in services.items()}
    out |= section_tables(RunConfig, "run")
    out["stack"] = table(("field", "type", "default", "meaning"), field_rows(StackConfig))
    return out


def render(page: str, tables: dict[str, str]) -> str:
    """The page with each marked block replaced by its table; ValueError for a table without markers or markers without one."""
    found = [m.group(2) for m in MARKER.finditer(page)]
    missing, unknown = sorted(set(tables) - set(found)), sorted(set(found) - set(tables))
    if missing or unknown:
        raise ValueError(f"generated tables without markers: {missing or 'none'}; markers of no table: {unknown or 'none'}")
    return MARKER.sub(lambda m: m.group(1) + tables[m.group(2)] + m.group(4), page)


def check(path: Path = PAGE, tables: dict[str, str] | None = None) -> str:
    """'' when the page holds what would be generated; else a unified diff (or what is wrong with its markers)."""
    page = path.read_text()
    try:
        wanted = render(page, all_tables() if tables is None else tables)
    except ValueError as exc:
        return str(exc)
    diff = difflib.unified_diff(page.splitlines(True), wanted.splitlines(True), str(path), f"{path} (generated)")
    return "".join(diff)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd.common.config_docs", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", metavar="PAGE", type=Path, nargs="?", const=PAGE, help="regenerate the tables in place")
    mode.add_argument("--check", metavar="PAGE", type=Path, nargs="?", const=PAGE, help="exit 1 with a diff on drift")
    args = parser.parse_args(argv)
    if args.write is not None:
        try:
            args.write.write_text(render(args.write.read_text(), all_tables()))
        except ValueError as exc:
            print(f"{args.write}: {exc}", file=sys.stderr)
            return 2
        return 0
    if diff := check(args.check):
        print(diff)
        print(f"{args.check} is out of date: run python -m opd.common.config_docs --write {args.check}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

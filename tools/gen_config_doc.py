"""Generate docs/configuration.md from the `daemon.settings.Settings` object.

    python tools/gen_config_doc.py           # rewrite docs/configuration.md
    python tools/gen_config_doc.py --check   # exit 1 if the committed file is stale (used by the tests)

Every field becomes one row: its TOML key, its MELO_* environment variable, type, default and the
field's own description, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT = REPO_ROOT / "docs" / "configuration.md"
sys.path.insert(0, str(REPO_ROOT))

from daemon.settings import Settings  # noqa: E402  (needs the repository on sys.path)

ENV_PREFIX = "MELO_"
NESTED_DELIMITER = "__"


@dataclass(frozen=True)
class Row:
    toml_key: str  # dotted path: kafka.topics.edits
    env: str  # MELO_KAFKA__TOPICS__EDITS
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class Section:
    path: tuple[str, ...]  # () for the top level
    title: str
    doc: str
    optional: bool  # an unset table (kafka, redis) switches a feature off
    rows: list[Row]


def _section_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The settings table a field holds (or None for a plain value), and whether it may be unset."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1 and type(None) in args:
            return models[0], True
        return None, False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def type_name(annotation: Any) -> str:
    """A reader's spelling of a field type: `int`, `list[str]`, `"a" | "b"`, `secret`, `path | None`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " \\| ".join(f'`"{a}"`' if isinstance(a, str) else f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a).strip("`") for a in args)
        return f"`{origin.__name__}[{inner}]`"
    if annotation is type(None):
        return "`None`"
    if annotation is SecretStr:
        return "secret"
    if annotation is Path:
        return "path"
    if annotation is Any:
        return "any"
    return f"`{getattr(annotation, '__name__', str(annotation))}`"


def default_text(field: FieldInfo) -> str:
    """The default as it reads in TOML-ish form, or `required`."""
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (str, Path)):
        return f'`"{value}"`'
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value) + "]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def _markdown_cell(text: str) -> str:
    """Text safe inside a markdown table cell: no column breaks, no `<name>` eaten as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def collect(model: type[BaseModel], path: tuple[str, ...] = (), optional: bool = False, title: str = "") -> list[Section]:
    """Sections in declaration order: the model's plain fields first, then one section per table."""
    rows: list[Row] = []
    nested: list[Section] = []
    for name, field in model.model_fields.items():
        sub_model, sub_optional = _section_model(field.annotation)
        key_path = (*path, name)
        if sub_model is not None:
            nested += collect(sub_model, key_path, sub_optional, field.description or "")
            continue
        rows.append(
            Row(
                toml_key=".".join(key_path),
                env=ENV_PREFIX + NESTED_DELIMITER.join(part.upper() for part in key_path),
                type=type_name(field.annotation),
                default=default_text(field),
                description=_markdown_cell(field.description or ""),
            )
        )
    doc = " ".join((model.__doc__ or "").split())
    heading = "Top level" if not path else "[" + ".".join(path) + "]"
    return [Section(path, heading if not title else f"{heading} — {title.rstrip('.')}", doc, optional, rows), *nested]


def env_names() -> set[str]:
    """Every MELO_* environment variable the settings object reads."""
    return {row.env for section in collect(Settings) for row in section.rows}


def render() -> str:
    """The whole of docs/configuration.md."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- GENERATED by tools/gen_config_doc.py from daemon/settings.py: do not edit by hand.",
        "     Regenerate with `python tools/gen_config_doc.py`; a test fails when this file is stale. -->",
        "",
        "`melo run`, `melo serve` and the other `melo` commands read one settings object: a TOML file",
        "(`--config FILE`) with `MELO_*` environment variables on top (environment wins). Nested tables use",
        "`__` in the environment: `[kafka] bootstrap_servers` is `MELO_KAFKA__BOOTSTRAP_SERVERS`. Lists are",
        "comma-separated in the environment and the `melo` table is JSON. Secrets are masked whenever",
        "settings are printed; give them through the environment (Kubernetes Secrets, docs/security.md),",
        "not the TOML file.",
        "",
        "Leaving `[kafka]` unset runs on the local spool directory and leaving `[redis]` unset keeps records in",
        "a local store (the embedded default); setting any of their variables switches the feature on.",
        "",
    ]
    for section in collect(Settings):
        lines += [f"## {section.title}", ""]
        if section.doc:
            lines += [section.doc, ""]
        if section.optional:
            key = ".".join(section.path)
            lines += [f"Optional table: unset by default; `[{key}]` in TOML or any `{ENV_PREFIX}{key.upper()}__*` variable enables it.", ""]
        lines += ["| Setting | Environment | Type | Default | Description |", "|---|---|---|---|---|"]
        for row in section.rows:
            lines.append(f"| `{row.toml_key}` | `{row.env}` | {row.type} | {row.default} | {row.description} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Write docs/configuration.md, or with --check report whether it is up to date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file differs from the generated one")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="file to write or check (default: %(default)s)")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run `python tools/gen_config_doc.py` and commit the result", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output} ({sum(len(s.rows) for s in collect(Settings))} settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

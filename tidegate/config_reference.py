"""Render the configuration reference (README) from the settings classes themselves.

One source of truth: the field docstrings. `python -m tidegate.config_reference`
prints the Markdown; tests/unit/test_readme.py fails when the README's copy is stale.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


def _model_of(annotation: object) -> type[BaseModel] | None:
    """The settings class inside ``X``, ``X | None`` or ``list[X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _type_name(annotation: object) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("|", "\\|")


def _bounds(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        for name, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(meta, name, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _plain(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _default(value: object) -> str:
    if value is PydanticUndefined:
        return "required"
    return f"`{json.dumps(_plain(value), default=str)}`"


def rows(model: type[BaseModel], prefix: str = "", defaults: object = None) -> Iterator[str]:
    """One table row per field, recursing into sections.

    ``defaults`` is the section's default instance: a parent may override the
    defaults of its section's own class (the cloud's model is not the edge's).
    """
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"  # the key as written in YAML
        nested = _model_of(field.annotation)
        is_list = typing.get_origin(field.annotation) is list
        value = (
            getattr(defaults, name)
            if defaults is not None
            else field.get_default(call_default_factory=True)
        )
        is_section = nested is not None and not is_list
        doc = " ".join((field.description or "").split())
        yield (
            f"| `{path}` | {'section' if is_section else _type_name(field.annotation)} "
            f"| {'(section)' if is_section else _default(value)} | {_bounds(field)} | {doc} |"
        )
        if nested is not None:
            section_defaults = value if is_section and isinstance(value, BaseModel) else None
            yield from rows(nested, f"{path}[]." if is_list else f"{path}.", section_defaults)


def render() -> str:
    from cloud_node.settings import CloudSettings
    from edge_node.settings import EdgeSettings
    from router.settings import RouterSettings

    sections: list[tuple[str, type[BaseModel], str, str]] = [
        ("Router", RouterSettings, "tidegate router serve --config router.yaml", "TIDEGATE_ROUTER"),
        ("Edge node", EdgeSettings, "tidegate edge serve --config edge.yaml", "TIDEGATE_EDGE"),
        ("Cloud node", CloudSettings, "tidegate cloud serve --config cloud.yaml", "TIDEGATE_CLOUD"),
    ]
    out = []
    for title, model, command, prefix in sections:
        out.append(f"#### {title} — `{command}`, env `{prefix}__SECTION__FIELD`\n")
        out.append("| field | type | default | bounds | meaning |")
        out.append("|---|---|---|---|---|")
        out.extend(rows(model, defaults=model()))
        out.append("")
    return "\n".join(out)


START = "<!-- config-reference:start (generated: python -m tidegate.config_reference --write) -->"
END = "<!-- config-reference:end -->"


def splice(readme: str) -> str:
    """``readme`` with the text between the markers replaced by ``render()``."""
    head, found, rest = readme.partition(START)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise ValueError("README.md lacks the config-reference markers")
    return f"{head}{START}\n{render()}\n{END}{tail}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if sys.argv[1:] == ["--write"]:
        readme = Path(__file__).resolve().parent.parent / "README.md"
        readme.write_text(splice(readme.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(render())

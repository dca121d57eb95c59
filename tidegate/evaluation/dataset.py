"""The labelled items ``tidegate eval`` reads: one JSON object per line.

Required keys: ``id`` (unique), ``question``, ``answers`` (accepted strings, at
least one). Optional: ``choices`` ({"A": text, …}: multiple choice),
``category``, ``split``, ``tags`` (list of strings; the category counts as a tag
too), ``tenant`` (for calibrating per-tenant rules). Unknown keys are ignored.
A bad line fails loading with its line number and what is wrong.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path

from tidegate.errors import ConfigError


@dataclass(frozen=True)
class EvalItem:
    id: str
    question: str
    answers: tuple[str, ...]
    choices: dict[str, str] | None = None
    category: str = ""
    split: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    tenant: str = ""

    @property
    def all_tags(self) -> tuple[str, ...]:
        """Explicit tags, plus the category (a dev set's natural tag)."""
        if self.category and self.category not in self.tags:
            return (*self.tags, self.category)
        return self.tags


def unreadable(path: Path, exc: OSError, what: str) -> ConfigError:
    """The error for a ``what`` ("data file", "items file") that cannot be opened."""
    if isinstance(exc, FileNotFoundError):
        return ConfigError(f"{what} {path} does not exist")
    if isinstance(exc, IsADirectoryError):
        return ConfigError(f"{what} {path} is a folder, not a file")
    return ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}")


def not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError, first_line: int = 1) -> ConfigError:
    """The error for bytes of ``path`` (from line ``first_line`` on) that are not UTF-8,
    naming the line."""
    line = first_line + data.count(b"\n", 0, exc.start)
    return ConfigError(
        f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
    )


def read_lines(path: Path, what: str) -> list[str]:
    """The lines of a JSON-lines file (split at newlines only: a JSON string may hold
    U+2028 and the like, which ``str.splitlines`` would split at); ConfigError saying
    what is wrong when it is missing, a folder, unreadable or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise unreadable(path, exc, what) from exc
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, data, exc) from exc
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _parse(raw: object, where: str) -> EvalItem:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    for key in ("id", "question"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise ConfigError(f"{where}: {key!r} must be a non-empty string")
    answers = raw.get("answers")
    if (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) and a.strip() for a in answers)
    ):
        raise ConfigError(f"{where}: 'answers' must be a non-empty list of non-empty strings")
    choices = raw.get("choices")
    if choices is not None and (
        not isinstance(choices, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in choices.items())
    ):
        raise ConfigError(f"{where}: 'choices' must map option letters to strings")
    tags = raw.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ConfigError(f"{where}: 'tags' must be a list of strings")
    return EvalItem(
        id=raw["id"],
        question=raw["question"],
        answers=tuple(answers),
        choices=dict(choices) if choices else None,
        category=str(raw.get("category", "")),
        split=str(raw.get("split", "")),
        tags=tuple(tags),
        tenant=str(raw.get("tenant", "")),
    )


def load_items(
    path: str | Path,
    split: str | None = None,
    limit: int | None = None,
    sample: int | None = None,
) -> list[EvalItem]:
    """Items of ``path`` (in file order), only ``split`` if given, then ``sample``
    items spread evenly over them (every n/sample-th: each category keeps its share
    when the file is grouped by category), then the first ``limit``."""
    path = Path(path)
    lines = read_lines(path, "data file")
    items: list[EvalItem] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from exc
        item = _parse(raw, where)
        if item.id in seen:
            raise ConfigError(f"{where}: id {item.id!r} appears twice")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise ConfigError(f"data file {path} has no items (it is empty or only blank lines)")
    if split is not None:
        items = [item for item in items if item.split == split]
        if not items:
            raise ConfigError(f"{path} has no items with split {split!r}")
    if sample is not None and sample < len(items):
        step = len(items) / sample
        items = [items[int(k * step)] for k in range(sample)]
    if limit is not None:
        items = items[:limit]
    return items

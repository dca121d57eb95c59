"""Writing calibrated thresholds into a router/policy YAML file, keeping the rest as it was.

ruamel.yaml (round-trip mode) *locates* each value — the line and column of
``min_confidence`` under a given mapping — and the edit itself is done on the
text lines: only the value token is replaced, so every other byte of the file
(comments, quoting, blank lines, key order) stays exactly as it was. A block of
comment lines starting with ``# calibrated:`` just above the key records where
the number comes from; re-calibrating replaces that block.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MARKER = "# calibrated:"
_TOKEN = re.compile(r"""("[^"]*"|'[^']*'|[^\s#]+)""")


@dataclass(frozen=True)
class ValueUpdate:
    """Set ``key`` to ``value`` in the mapping found at ``path`` (keys / list indices)."""

    path: tuple[str | int, ...]
    key: str
    value: str  # the YAML text of the new value, e.g. "0.4375" or "combiner"
    comment: Sequence[str] = ()  # provenance lines written above the key (without "#")


def _load(text: str) -> Any:
    from ruamel.yaml import YAML

    return YAML(typ="rt").load(io.StringIO(text))


def _mapping_at(data: Any, path: tuple[str | int, ...]) -> Any:
    node = data
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError) as exc:
            shown = ".".join(str(p) for p in path)
            raise ValueError(f"the policy file has no {shown!r} section") from exc
    if not hasattr(node, "lc") or not isinstance(node, dict):
        raise ValueError(f"{'.'.join(str(p) for p in path)!r} is not a mapping")
    style = getattr(node, "fa", None)  # ruamel's format attribute (flow or block)
    if style is not None and style.flow_style():
        raise ValueError(
            f"{'.'.join(str(p) for p in path)!r} is a flow mapping ({{…}}); use block style"
        )
    return node


def _comment_block(lines: list[str], key_line: int, indent: str, comment: Sequence[str]) -> int:
    """Replace the ``# calibrated:`` block above ``key_line``; return the key's new line."""
    start = key_line
    while start > 0 and lines[start - 1].strip().startswith(MARKER):
        start -= 1
    new = [f"{indent}{MARKER} {line}\n" if line else f"{indent}{MARKER}\n" for line in comment]
    lines[start:key_line] = new
    return start + len(new)


def apply_updates(text: str, updates: Sequence[ValueUpdate]) -> str:
    """``text`` with every update applied (see the module docstring)."""
    data = _load(text)
    if data is None:
        data = {}
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    edits: list[tuple[int, ValueUpdate, Any]] = []
    appends: list[ValueUpdate] = []
    for update in updates:
        try:
            node = _mapping_at(data, update.path)
        except ValueError:
            if update.path == ("policy",) and "policy" not in data:
                appends.append(update)
                continue
            raise
        if update.key in node:
            line, _ = node.lc.value(update.key)
        else:
            first = next(iter(node), None)
            if first is None:
                raise ValueError(f"{'.'.join(map(str, update.path))!r} is an empty mapping")
            line, _ = node.lc.key(first)
        edits.append((line, update, node))
    # Bottom-up, so earlier line numbers stay valid; on one line, the value replaced in
    # place before a new key is inserted above it (which moves that line down).
    bottom_up = sorted(edits, key=lambda e: (e[0], e[1].key in e[2]), reverse=True)
    for _, update, node in bottom_up:
        if update.key in node:
            key_line, _ = node.lc.key(update.key)
            value_line, col = node.lc.value(update.key)
            if value_line != key_line:
                raise ValueError(f"{update.key}: put its value on the same line as the key")
            line = lines[value_line]
            match = _TOKEN.match(line, col)
            if match is None:
                raise ValueError(f"{update.key}: no value found on line {value_line + 1}")
            rest = line[match.end() :]
            gap = re.match(r"( +)#", rest)
            if gap:  # keep a trailing comment in its column when the new value allows
                width = max(1, len(gap.group(1)) - (len(update.value) - len(match.group(0))))
                rest = " " * width + rest[len(gap.group(1)) :]
            lines[value_line] = line[: match.start()] + update.value + rest
        else:
            first = next(iter(node))
            key_line, col = node.lc.key(first)
            while key_line > 0 and lines[key_line - 1].strip().startswith(MARKER):
                key_line -= 1  # above the first key's own provenance block, not inside it
            lines.insert(key_line, f"{' ' * col}{update.key}: {update.value}\n")
        if update.comment:
            indent = re.match(r"\s*", lines[key_line]).group(0)  # type: ignore[union-attr]
            _comment_block(lines, key_line, indent, update.comment)
    if appends:
        lines.append("policy:\n")
        for update in appends:
            lines.extend(f"  {MARKER} {c}\n" for c in update.comment)
            lines.append(f"  {update.key}: {update.value}\n")
    result = "".join(lines)
    _load(result)  # still YAML
    return result

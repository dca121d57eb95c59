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


def _load(text: str, what: str = "the file") -> Any:
    """Round-trip load; ValueError (not ruamel's own errors) when ``text`` is not YAML
    ruamel.yaml can read."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        return YAML(typ="rt").load(io.StringIO(text))
    except YAMLError as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, MarkedYAMLError) and exc.problem:
            problem = exc.problem
            mark = exc.problem_mark or exc.context_mark
            if mark is not None:
                problem += f" (line {mark.line + 1})"
        raise ValueError(f"{what} is not YAML this tool can edit: {problem}") from exc


def _aliases(text: str) -> set[str]:
    """The anchor names that ``*alias`` refers to somewhere in ``text``."""
    from ruamel.yaml import YAML
    from ruamel.yaml.events import AliasEvent

    events = YAML(typ="rt").parse(io.StringIO(text))
    return {e.anchor for e in events if isinstance(e, AliasEvent) and e.anchor}


def _newline(text: str) -> str:
    """The file's line ending (CRLF or LF), for the lines written into it."""
    end = text.find("\n")
    return "\r\n" if end > 0 and text[end - 1] == "\r" else "\n"


def _name(path: tuple[str | int, ...], key: str | None = None) -> str:
    return ".".join(str(p) for p in (*path, *([key] if key else [])))


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


def _comment_block(
    lines: list[str], key_line: int, indent: str, comment: Sequence[str], nl: str = "\n"
) -> int:
    """Replace the ``# calibrated:`` block above ``key_line``; return the key's new line."""
    start = key_line
    while start > 0 and lines[start - 1].strip().startswith(MARKER):
        start -= 1
    new = [f"{indent}{MARKER} {line}{nl}" if line else f"{indent}{MARKER}{nl}" for line in comment]
    lines[start:key_line] = new
    return start + len(new)


def _own(node: Any, key: str) -> bool:
    """Whether ``key`` is written in ``node`` itself (not only merged in with ``<<:``)."""
    return key in node.lc.data


def _insertion_point(node: Any, lines: list[str], update: ValueUpdate) -> tuple[int, int]:
    """Line and column of the first key of ``node`` that begins its line (not one after
    a rule's "- "): a new key goes above it, at its column."""
    for line, col in sorted((pos[0], pos[1]) for pos in node.lc.data.values()):
        if not lines[line][:col].strip():
            return line, col
    where = _name(update.path)
    if node.lc.data:
        raise ValueError(
            f"{where!r}: cannot add {update.key!r} to it: none of its keys (a merge key <<: "
            f"aside) begins a line of its own; add `{update.key}:` to it yourself and run again"
        )
    if len(node):  # every key comes from a merge key
        raise ValueError(
            f"{where!r} gets {update.key!r} only through a merge key (<<:) and has no key of "
            f"its own to add it beside; add `{update.key}:` to it yourself and run again"
        )
    raise ValueError(f"{where!r} is an empty mapping")


# "key: *name" (a comment after it aside): the whole line from the key's column on.
_ALIAS = re.compile(
    r"""(?:"[^"]*"|'[^']*'|[^\s:#]+)[ \t]*:[ \t]+(\*[^\s,\[\]{}]+)(?:[ \t]+#[^\r\n]*)?[ \t]*\r?$"""
)
_PROPERTY = re.compile(r"([&!]\S*)[ \t]+")  # a value's anchor (&name) or tag (!!float)


def _value_start(line: str, col: int, update: ValueUpdate, text: str) -> int:
    """Where the value's own token starts at ``col``: after a tag (kept) or an anchor
    (kept unless some alias refers to it: changing the value would change those too)."""
    while (prop := _PROPERTY.match(line, col)) is not None:
        if prop.group(1).startswith("&") and prop.group(1)[1:] in _aliases(text):
            anchor = prop.group(1)[1:]
            raise ValueError(
                f"{_name(update.path, update.key)}: its value carries the anchor &{anchor}, "
                f"and *{anchor} refers to it elsewhere: a new value here would change those "
                f"too. Write the value itself where *{anchor} is used, drop the anchor, and "
                "run again"
            )
        col = prop.end()
    return col


def _check_applied(result: str, updates: Sequence[ValueUpdate]) -> None:
    """Every update reads back from ``result`` as its new value (else ValueError)."""
    data = _load(result, "the edited file")
    for update in updates:
        wanted = _load(f"v: {update.value}\n", "the new value")["v"]
        try:
            got = _mapping_at(data, update.path)[update.key]
        except (ValueError, KeyError):
            got = None
        if got != wanted:
            raise ValueError(
                f"{_name(update.path, update.key)}: the edit would not set it to "
                f"{update.value} (it reads back as {got!r}); the file's layout there is not "
                "one this tool can edit"
            )


def apply_updates(text: str, updates: Sequence[ValueUpdate]) -> str:
    """``text`` with every update applied (see the module docstring); ValueError, and
    nothing changed, when the file cannot be edited so."""
    data = _load(text)
    if data is None:
        data = {}
    nl = _newline(text)
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += nl
    edits: list[tuple[int, ValueUpdate, Any]] = []
    appends: list[ValueUpdate] = []
    for update in updates:
        try:
            node = _mapping_at(data, update.path)
        except ValueError:
            if update.path == ("policy",) and isinstance(data, dict) and "policy" not in data:
                appends.append(update)
                continue
            raise
        if _own(node, update.key):
            line, _ = node.lc.value(update.key)
        else:
            line, _ = _insertion_point(node, lines, update)
        edits.append((line, update, node))
    # Bottom-up, so earlier line numbers stay valid; on one line, the value replaced in
    # place before a new key is inserted above it (which moves that line down).
    bottom_up = sorted(edits, key=lambda e: (e[0], _own(e[2], e[1].key)), reverse=True)
    for _, update, node in bottom_up:
        if _own(node, update.key):
            key_line, key_col = node.lc.key(update.key)
            value_line, col = node.lc.value(update.key)
            alias = _ALIAS.match(lines[key_line], key_col)
            if alias is not None:  # ruamel places an alias's value where its anchor is
                value_line, col = key_line, alias.start(1)
            if value_line != key_line:
                raise ValueError(f"{update.key}: put its value on the same line as the key")
            line = lines[value_line]
            match = _TOKEN.match(line, _value_start(line, col, update, text))
            if match is None:
                raise ValueError(f"{update.key}: no value found on line {value_line + 1}")
            rest = line[match.end() :]
            gap = re.match(r"( +)#", rest)
            if gap:  # keep a trailing comment in its column when the new value allows
                width = max(1, len(gap.group(1)) - (len(update.value) - len(match.group(0))))
                rest = " " * width + rest[len(gap.group(1)) :]
            lines[value_line] = line[: match.start()] + update.value + rest
        else:
            key_line, col = _insertion_point(node, lines, update)
            while key_line > 0 and lines[key_line - 1].strip().startswith(MARKER):
                key_line -= 1  # above the first key's own provenance block, not inside it
            lines.insert(key_line, f"{' ' * col}{update.key}: {update.value}{nl}")
        if update.comment:
            indent = re.match(r"\s*", lines[key_line]).group(0)  # type: ignore[union-attr]
            _comment_block(lines, key_line, indent, update.comment, nl)
    if appends:
        _append_policy(data, lines, appends, nl)
    result = "".join(lines)
    _check_applied(result, updates)
    return result


def _append_policy(data: Any, lines: list[str], appends: Sequence[ValueUpdate], nl: str) -> None:
    """A ``policy:`` section with ``appends``' keys, at the end of the document (before a
    closing "..." line)."""
    style = getattr(data, "fa", None)
    if style is not None and style.flow_style():
        raise ValueError(
            "the file is one flow mapping ({…}) without a policy section: write it in block "
            "style (a key a line) to add one"
        )
    block = [f"policy:{nl}"]
    for update in appends:
        block.extend(f"  {MARKER} {c}{nl}" for c in update.comment)
        block.append(f"  {update.key}: {update.value}{nl}")
    ends = (i for i, line in enumerate(lines) if re.match(r"\.\.\.(\s|$)", line))
    at = next(ends, len(lines))
    lines[at:at] = block

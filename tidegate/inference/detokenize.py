"""Incremental detokenization for streaming, with stop-string handling.

Two rules make the streamed deltas safe to show as they arrive:
- never emit a partial multi-byte character: while the decoded tail ends in
  U+FFFD (an incomplete byte sequence), wait for the next token;
- hold back any suffix that could be the start of a stop string, and cut the
  text before the first complete stop string (which is never emitted).

The concatenation of all deltas (plus ``finish()``) is exactly the final text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Decodes a growing list of token ids into text deltas (TGI-style offsets)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # ids before this are already turned into text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (maybe "")."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still pending at the end (an incomplete character shows as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


def _held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class StopTextBuffer:
    """Accumulates decoded text; releases what cannot be part of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # everything decoded so far (up to the stop string, once found)
        self.emitted = 0  # len of the prefix of ``text`` already released
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add decoded text; return the delta that is safe to release now."""
        if self.stopped or not piece:
            return ""
        self.text += piece
        # A stop string can only start at or after ``emitted``: an earlier start
        # would have been held back as a possible prefix.
        cut = min(
            (i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0),
            default=-1,
        )
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - _held_suffix(self.text, self.stops))

    def finish(self) -> str:
        """Release everything held back (generation ended without a stop string)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta

"""Edits of a Corefile's text at the places the lexer found, applied together.

Each edit names a source span (token offsets), so everything it does not touch stays byte for byte as the
template's author wrote it. :meth:`Splice.text` can also tidy what the edits leave behind: a line whose every
token or comment was deleted goes, and so does whitespace left at the end of a line.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from agent.corefile.lexer import WHITESPACE, Lexed

_LINE_SPACE = WHITESPACE.replace("\n", "")


@dataclass(frozen=True, order=True)
class _Edit:
    start: int
    end: int
    text: str


class Splice:
    """Replacements, insertions and deletions of spans of ``lexed.text``.

    Deletions may overlap (they merge); a replacement or insertion inside a deleted span is dropped with it.
    Any other overlap is a bug in the caller and raises ValueError."""

    def __init__(self, lexed: Lexed) -> None:
        self.lexed = lexed
        self._edits: list[_Edit] = []

    def replace(self, start: int, end: int, text: str) -> None:
        self._edits.append(_Edit(start, end, text))

    def delete(self, start: int, end: int) -> None:
        self._edits.append(_Edit(start, end, ""))

    def insert(self, at: int, text: str) -> None:
        self._edits.append(_Edit(at, at, text))

    def drop_comments(self) -> None:
        for comment in self.lexed.comments:
            self.delete(comment.start, comment.end)

    def text(self, *, tidy: bool = False) -> str:
        """The edited text. ``tidy``: lines the deletions emptied go, and whitespace left at line ends."""
        deleted = _merge([(e.start, e.end) for e in self._edits if e.start < e.end and not e.text])
        if tidy:
            deleted = _merge(deleted + self._tidying(deleted))
        starts = [s for s, _ in deleted]

        def swallowed(edit: _Edit) -> bool:
            k = bisect.bisect_right(starts, edit.start) - 1
            if k < 0:
                return False
            start, end = deleted[k]
            if edit.start == edit.end:  # an insertion at either end of a deleted span stays
                return start < edit.start < end
            return start <= edit.start and edit.end <= end

        edits = sorted(
            [_Edit(s, e, "") for s, e in deleted] + [e for e in self._edits if e.text and not swallowed(e)]
        )
        source = self.lexed.text
        out: list[str] = []
        pos = 0
        for edit in edits:
            if edit.start < pos:
                raise ValueError(f"Corefile edits overlap at offset {edit.start}")
            out += (source[pos : edit.start], edit.text)
            pos = edit.end
        out.append(source[pos:])
        return "".join(out)

    def _tidying(self, deleted: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Deletions of the lines ``deleted`` emptied (their line break too), and of whitespace it left at
        line ends. Whitespace inside a quoted string is the string's and stays."""
        source = self.lexed.text
        starts = [s for s, _ in deleted]
        quoted = [(t.start, t.end) for t in self.lexed.tokens if t.quoted]
        quoted_starts = [s for s, _ in quoted]

        def is_deleted(offset: int) -> bool:
            k = bisect.bisect_right(starts, offset) - 1
            return k >= 0 and deleted[k][0] <= offset < deleted[k][1]

        def blank(offset: int) -> bool:
            k = bisect.bisect_right(quoted_starts, offset) - 1
            return source[offset] in _LINE_SPACE and not (k >= 0 and quoted[k][0] <= offset < quoted[k][1])

        more: list[tuple[int, int]] = []
        line_start = 0
        while line_start < len(source):
            line_end = source.find("\n", line_start)
            line_end = len(source) if line_end < 0 else line_end
            visible = [o for o in range(line_start, line_end) if not blank(o)]
            joined = line_start > 0 and is_deleted(line_start - 1)  # its line break before it is gone
            if visible and not joined and all(is_deleted(o) for o in visible):
                more.append((line_start, min(line_end + 1, len(source))))
            else:
                end = line_end
                while end > line_start and (is_deleted(end - 1) or blank(end - 1)):
                    end -= 1
                if end < line_end:
                    more.append((end, line_end))
            line_start = line_end + 1
        return more


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged

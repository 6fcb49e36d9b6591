"""The Corefile's tokens, read as CoreDNS's lexer (coredns/caddy ``caddyfile/lexer.go``) reads them.

Every edit of a Corefile starts here, so that all of them agree on what a comment, a quoted string and a
brace are:

- tokens are separated by whitespace (Go's ``unicode.IsSpace``; ``\\r`` is whitespace too);
- a token that starts with ``"`` runs to the next unescaped ``"``, across lines if need be; inside it ``\\"``
  is a quote and any other backslash stays as written. A quote inside a word (``a"b``) is just a character;
- ``#`` outside quotes starts a comment: at the start of a token it runs to the end of the line; glued to a
  word (``word#x``) it ends the word and hides only the rest of that word;
- ``{`` and ``}`` are braces only as tokens of their own (``cache{`` is one word, as CoreDNS reads it);
- ``{$NAME}`` (and ``{%NAME%}``) inside a token is an environment placeholder CoreDNS fills in at load.

Each token keeps its place in the text (offset, line, column), so that an edit can splice the original text
and leave the rest of the file exactly as it was written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.settings import ConfigError


class CorefileError(ConfigError):
    """The Corefile cannot be read or rendered from these inputs; the message names the place and problem."""


# Go's unicode.IsSpace: what separates CoreDNS's tokens (Python's str.isspace also counts \x1c-\x1f).
WHITESPACE = " \t\n\r\v\f\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
    "\u2028\u2029\u202f\u205f\u3000"  # fmt: skip
_SPACE = "[" + re.escape(WHITESPACE) + "]"
_NOT_SPACE = "[^" + re.escape(WHITESPACE) + "]"
_WHITESPACE_RUN = re.compile(_SPACE + "+")
_LINE_COMMENT = re.compile(r"#[^\n]*")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S)
_WORD = re.compile("[^#" + re.escape(WHITESPACE) + "]+")
_GLUED_COMMENT = re.compile("#" + _NOT_SPACE + "*")
_ESCAPE = re.compile(r"\\(.)", re.S)
_INDENT = re.compile("[ \t]*")
ENV_PLACEHOLDER = re.compile(r"\{\$([^}]+)\}|\{%([^%]+)%\}")
BYTE_ORDER_MARK = "\ufeff"


@dataclass(frozen=True)
class Token:
    """One token: ``text`` as CoreDNS sees it (quotes removed, ``\\"`` unescaped); ``start``/``end`` are
    offsets of its source span (quotes included); ``line`` and ``column`` (1-based) where it starts."""

    text: str
    start: int
    end: int
    line: int
    column: int
    quoted: bool = False

    @property
    def opens(self) -> bool:
        # CoreDNS compares the text only: a quoted "{" is a brace to it as well.
        return self.text == "{"

    @property
    def closes(self) -> bool:
        return self.text == "}"

    @property
    def env_placeholders(self) -> tuple[str, ...]:
        """The environment variables CoreDNS substitutes into this token when it loads the file."""
        return tuple(m.group(1) or m.group(2) for m in ENV_PLACEHOLDER.finditer(self.text))


@dataclass(frozen=True)
class Comment:
    """A comment's source span (from its ``#``), for edits that drop comments."""

    start: int
    end: int
    line: int


@dataclass(frozen=True)
class Lexed:
    """A Corefile's text and what the lexer found in it, in order."""

    text: str
    tokens: tuple[Token, ...]
    comments: tuple[Comment, ...]

    def line_start(self, offset: int) -> int:
        """The offset where the line holding ``offset`` begins."""
        return self.text.rfind("\n", 0, offset) + 1

    def indent(self, token: Token) -> str:
        """The whitespace that starts the line holding ``token``."""
        match = _INDENT.match(self.text, self.line_start(token.start))
        return match.group(0) if match else ""


def lex(text: str) -> Lexed:
    """The tokens and comments of ``text``; raises CorefileError for a quoted string that is not closed.

    (CoreDNS would take the rest of the file as the string and then fail on the unclosed block; naming the
    line of the opening quote is more use to whoever edits the file.)"""
    tokens: list[Token] = []
    comments: list[Comment] = []
    pos = 1 if text.startswith(BYTE_ORDER_MARK) else 0  # CoreDNS discards a byte order mark
    line = 1
    line_start = 0

    def advance(to: int) -> None:
        nonlocal pos, line, line_start
        breaks = text.count("\n", pos, to)
        if breaks:
            line += breaks
            line_start = text.rfind("\n", pos, to) + 1
        pos = to

    while pos < len(text):
        if match := _WHITESPACE_RUN.match(text, pos):
            advance(match.end())
        elif match := _LINE_COMMENT.match(text, pos):
            comments.append(Comment(pos, match.end(), line))
            advance(match.end())
        elif text[pos] == '"':
            if not (match := _QUOTED.match(text, pos)):
                raise CorefileError(f"Corefile line {line}: a quoted string is not closed")
            # Only a quote can be escaped; any other backslash stays.
            value = _ESCAPE.sub(lambda m: m.group(1) if m.group(1) == '"' else m.group(0), match.group(1))
            tokens.append(Token(value, pos, match.end(), line, pos - line_start + 1, quoted=True))
            advance(match.end())
        else:
            match = _WORD.match(text, pos)
            assert match is not None  # not whitespace, not '#', not '"': at least one word character
            tokens.append(Token(match.group(0), pos, match.end(), line, pos - line_start + 1))
            advance(match.end())
            if glued := _GLUED_COMMENT.match(text, pos):
                comments.append(Comment(pos, glued.end(), line))
                advance(glued.end())
    return Lexed(text, tuple(tokens), tuple(comments))

"""Server blocks, snippets and directives of a Corefile, grouped from the lexer's tokens as CoreDNS does.

The rules are those of coredns/caddy's ``caddyfile/parse.go`` and of the dispenser its plugins read with:

- a server block is its keys (on one line, or continued after a trailing comma) and a ``{`` on that line or
  the next, up to the matching ``}``; a block whose only key is ``(name)`` is a snippet, which
  ``import name`` splices in wherever it appears;
- inside, each directive starts a line: its name, its arguments on that line, and an optional block whose
  ``{`` ends that line (plugins open blocks on the directive's line: ``NextBlock``);
- a ``}`` starts its line, unless it closes an empty block (``cache { }``): CoreDNS's parser refuses
  ``directive }`` in a server block, and inside a directive's block a plugin reads a ``}`` that follows a
  line's tokens as one more argument (``RemainingArgs``), so ``forward . 1.1.1.1 { force_tcp }`` fails.

Refusing here what CoreDNS would refuse means an edit never has to guess what a malformed file meant.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from agent.corefile.lexer import CorefileError, Lexed, Token, lex

_SCHEME = re.compile(r"^[a-z0-9+.-]+://")


@dataclass(frozen=True)
class Directive:
    """A directive (or a line inside a directive's block): its name, arguments and block."""

    name: Token
    args: tuple[Token, ...] = ()
    block: Block | None = None

    @property
    def start(self) -> int:
        return self.name.start

    @property
    def end(self) -> int:
        """Where the directive's last token ends (its block's ``}``, else its last argument)."""
        if self.block is not None:
            return self.block.close.end
        return self.args[-1].end if self.args else self.name.end

    @property
    def arg_texts(self) -> tuple[str, ...]:
        return tuple(arg.text for arg in self.args)


@dataclass(frozen=True)
class Block:
    """A ``{ … }`` block: its braces and the directives (lines) at its top level."""

    open: Token
    close: Token
    directives: tuple[Directive, ...]

    def has(self, name: str) -> bool:
        return any(d.name.text == name for d in self.directives)


@dataclass(frozen=True)
class ServerBlock:
    keys: tuple[Token, ...]
    body: Block
    # The body's directives with the snippets it imports spliced in, as CoreDNS's plugins see them.
    expanded: tuple[Directive, ...]

    @property
    def line(self) -> int:
        return self.keys[0].line

    @property
    def zones(self) -> tuple[tuple[str, int | None], ...]:
        """(zone without trailing dot, "" for the root; port, or None for CoreDNS's default port)."""
        zones: list[tuple[str, int | None]] = []
        for key in self.keys:
            text = _SCHEME.sub("", key.text.removesuffix(",").lower())
            zone, sep, port = text.rpartition(":")
            if not sep or not port.isdigit():
                zone, port = text, ""
            zones.append((zone.removesuffix("."), int(port) if port else None))
        return tuple(zones)

    @property
    def directives(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Each directive's name and arguments, imported snippets included."""
        return tuple((d.name.text, d.arg_texts) for d in self.expanded)


@dataclass(frozen=True)
class Snippet:
    key: Token
    body: Block

    @property
    def name(self) -> str:
        return self.key.text[1:-1]


@dataclass(frozen=True)
class Corefile:
    lexed: Lexed
    servers: tuple[ServerBlock, ...]
    snippets: tuple[Snippet, ...]
    imports: tuple[Directive, ...]  # top-level ``import`` lines

    def top_level_directives(self) -> Iterator[Directive]:
        """The directives as written at the top of every server block and snippet (where an edit goes)."""
        for block in (*(s.body for s in self.servers), *(s.body for s in self.snippets)):
            yield from block.directives


def server_blocks(text: str) -> list[ServerBlock]:
    """The server blocks of a Corefile; raises CorefileError for what CoreDNS would refuse to group."""
    return list(parse(text).servers)


def parse(source: str | Lexed) -> Corefile:
    lexed = lex(source) if isinstance(source, str) else source
    return _Parser(lexed).corefile()


class _Parser:
    def __init__(self, lexed: Lexed) -> None:
        self.lexed = lexed
        self.tokens = lexed.tokens
        self.i = 0

    def corefile(self) -> Corefile:
        servers: list[ServerBlock] = []
        snippets: dict[str, Snippet] = {}
        imports: list[Directive] = []
        while self.i < len(self.tokens):
            token = self.tokens[self.i]
            if token.closes:
                raise CorefileError(f"Corefile line {token.line}: '}}' closes no block")
            if token.opens:
                raise CorefileError(f"Corefile line {token.line}: '{{' without a server block key")
            if token.text == "import":
                imports.append(self._import(self._directive()))
                continue
            keys = self._keys()
            what = " ".join(k.text for k in keys)
            body = self._block(what, keys[0].line)
            if len(keys) == 1 and keys[0].text.startswith("(") and keys[0].text.endswith(")"):
                snippet = Snippet(keys[0], body)
                if snippet.name in snippets:
                    raise CorefileError(f"Corefile line {keys[0].line}: snippet {what} is defined twice")
                snippets[snippet.name] = snippet
            else:
                servers.append(ServerBlock(keys, body, _expand(body.directives, snippets, ())))
        return Corefile(self.lexed, tuple(servers), tuple(snippets.values()), tuple(imports))

    def _keys(self) -> tuple[Token, ...]:
        """A server block's keys: tokens up to ``{`` (which may stand alone on the next line, as CoreDNS
        allows), on one line unless a key ends with a comma."""
        keys: list[Token] = []
        while self.i < len(self.tokens):
            token = self.tokens[self.i]
            if token.opens:
                if keys[-1].text.endswith(","):
                    raise CorefileError(
                        f"Corefile line {token.line}: another key must follow {keys[-1].text!r}"
                    )
                return tuple(keys)
            if keys and self._new_line(self.i) and not keys[-1].text.endswith(","):
                break
            if token.closes:
                raise CorefileError(f"Corefile line {token.line}: '}}' closes no block")
            keys.append(token)
            self.i += 1
        raise CorefileError(f"Corefile line {keys[0].line}: {' '.join(k.text for k in keys)} has no block")

    def _block(self, what: str, line: int) -> Block:
        """The block whose ``{`` is the current token, up to its ``}``."""
        opening = self.tokens[self.i]
        self.i += 1
        directives: list[Directive] = []
        while self.i < len(self.tokens):
            token = self.tokens[self.i]
            if token.closes:
                self.i += 1
                return Block(opening, token, tuple(directives))
            if token.opens:
                raise CorefileError(f"Corefile line {token.line}: '{{' without a directive before it")
            directive = self._directive()
            directives.append(self._import(directive) if directive.name.text == "import" else directive)
        raise CorefileError(f"Corefile line {line}: the block of {what} is not closed")

    def _directive(self) -> Directive:
        """The directive starting at the current token: the rest of its line, and its block if it has one."""
        name = self.tokens[self.i]
        self.i += 1
        args: list[Token] = []
        while self.i < len(self.tokens) and not self._new_line(self.i):
            token = self.tokens[self.i]
            if token.closes:
                raise CorefileError(
                    f"Corefile line {token.line}: the '}}' after {name.text} must start a line "
                    f"(CoreDNS reads it as an argument of {name.text}, or refuses it)"
                )
            if token.opens:
                block = self._block(name.text, name.line)
                if self.i < len(self.tokens) and not self._new_line(self.i):
                    after = self.tokens[self.i]
                    raise CorefileError(
                        f"Corefile line {after.line}: {after.text!r} after the block of {name.text} "
                        "must start a line"
                    )
                return Directive(name, tuple(args), block)
            args.append(token)
            self.i += 1
        if self.i < len(self.tokens) and self.tokens[self.i].opens:
            raise CorefileError(
                f"Corefile line {self.tokens[self.i].line}: the block of {name.text} must open on its "
                f"line (line {name.line}), as CoreDNS's plugins read it"
            )
        return Directive(name, tuple(args))

    def _import(self, directive: Directive) -> Directive:
        if len(directive.args) != 1 or directive.block is not None:
            raise CorefileError(
                f"Corefile line {directive.name.line}: import takes one argument (a snippet or a file)"
            )
        return directive

    def _new_line(self, index: int) -> bool:
        """Whether token ``index`` starts a line: the previous token (a quoted one may span lines) ended on
        an earlier line."""
        previous = self.tokens[index - 1]
        end_line = previous.line + self.lexed.text.count("\n", previous.start, previous.end)
        return end_line < self.tokens[index].line


def _expand(
    directives: tuple[Directive, ...], snippets: dict[str, Snippet], importing: tuple[str, ...]
) -> tuple[Directive, ...]:
    """``directives`` with each ``import`` of a snippet defined so far replaced by the snippet's own."""
    out: list[Directive] = []
    for directive in directives:
        name = directive.arg_texts[0] if directive.name.text == "import" else None
        if name is None or name not in snippets:
            out.append(directive)  # a directive, or the import of a file (CoreDNS reads it at load)
        elif name in importing:
            raise CorefileError(f"Corefile line {directive.name.line}: snippet ({name}) imports itself")
        else:
            out += _expand(snippets[name].body.directives, snippets, (*importing, name))
    return tuple(out)

"""The one Corefile lexer and the server-block parse on top of it, by CoreDNS's rules (coredns/caddy)."""

from __future__ import annotations

import pytest

from agent.corefile.lexer import CorefileError, lex
from agent.corefile.parse import parse, server_blocks


def texts(source: str) -> list[str]:
    return [token.text for token in lex(source).tokens]


def test_a_hash_inside_quotes_is_text_and_outside_starts_a_comment() -> None:
    source = 'answer "a # b" # the rest goes\nnext'
    lexed = lex(source)
    assert [t.text for t in lexed.tokens] == ["answer", "a # b", "next"]
    assert [source[c.start : c.end] for c in lexed.comments] == ["# the rest goes"]


def test_a_hash_glued_to_a_word_ends_the_word_and_hides_only_the_rest_of_it() -> None:
    # CoreDNS's lexer: the comment flag lives until the token ends, so the next word is read again.
    source = "errors#note kept\n"
    assert texts(source) == ["errors", "kept"]
    assert [source[c.start : c.end] for c in lex(source).comments] == ["#note"]


def test_quoted_strings_unescape_only_quotes_and_may_span_lines() -> None:
    assert texts(r'A "quoted \"value\" inside" B') == ["A", 'quoted "value" inside', "B"]
    assert texts(r'"C:\php\php-cgi.exe" "do not\\escape"') == [r"C:\php\php-cgi.exe", r"do not\\escape"]
    assert texts('empty "" string') == ["empty", "", "string"]
    lexed = lex('A "line\nbreak" {\nfoobar\n}')
    assert [(t.text, t.line) for t in lexed.tokens] == [
        ("A", 1), ("line\nbreak", 1), ("{", 2), ("foobar", 3), ("}", 4),
    ]  # fmt: skip


def test_a_quote_inside_a_word_is_a_character_and_a_closing_quote_ends_the_token() -> None:
    assert texts('a"}" "x"y') == ['a"}"', "x", "y"]


def test_tokens_keep_their_place_so_edits_can_splice_the_text() -> None:
    source = '\ufeff.:53 {\r\n    answer "x y"\r\n}'
    tokens = lex(source).tokens
    assert [(t.text, t.line, t.column) for t in tokens] == [
        (".:53", 1, 2), ("{", 1, 7), ("answer", 2, 5), ("x y", 2, 12), ("}", 3, 1),
    ]  # fmt: skip
    assert [source[t.start : t.end] for t in tokens] == [".:53", "{", "answer", '"x y"', "}"]
    assert tokens[3].quoted and not tokens[2].quoted


def test_braces_are_tokens_of_their_own_only() -> None:
    assert texts(".:53{ x }") == [".:53{", "x", "}"]
    assert texts("health.node-local-dns:{$NODE_LOCAL_DNS_PROBE_PORT} {") == [
        "health.node-local-dns:{$NODE_LOCAL_DNS_PROBE_PORT}", "{",
    ]  # fmt: skip


def test_environment_placeholders_are_found_in_tokens() -> None:
    token = lex("zone:{$PORT}{%OTHER%}").tokens[0]
    assert token.env_placeholders == ("PORT", "OTHER")


def test_an_unclosed_quote_is_named_by_the_line_it_opens_on() -> None:
    with pytest.raises(CorefileError, match=r"^Corefile line 2: a quoted string is not closed$"):
        lex('.:53 {\n    answer "open\n}\n')


NESTED = """\
.:53 {
    errors # a comment after a directive
    cache { # a comment after {
        success 9984 30
    }
    template IN A example.org {
        answer "{{ .Name }} 60 IN TXT \\"}\\""
        fallthrough
    }
    forward . 10.0.0.1 { force_tcp
    }
    reload { }
}
"""


def test_server_blocks_hold_directives_with_their_args_and_nested_blocks() -> None:
    (server,) = parse(NESTED).servers
    assert server.zones == (("", 53),)
    assert server.directives == (
        ("errors", ()), ("cache", ()), ("template", ("IN", "A", "example.org")),
        ("forward", (".", "10.0.0.1")), ("reload", ()),
    )  # fmt: skip
    cache, template, forward, reload = server.body.directives[1:]
    assert cache.block is not None and [d.name.text for d in cache.block.directives] == ["success"]
    assert template.block is not None
    assert [(d.name.text, d.arg_texts) for d in template.block.directives] == [
        ("answer", ('{{ .Name }} 60 IN TXT "}"',)), ("fallthrough", ()),
    ]  # fmt: skip
    assert forward.block is not None and forward.block.has("force_tcp")
    assert NESTED[forward.start : forward.end] == "forward . 10.0.0.1 { force_tcp\n    }"
    assert reload.block is not None and reload.block.directives == ()


def test_a_server_block_may_open_on_the_next_line_and_keys_continue_after_a_comma() -> None:
    blocks = server_blocks("a.example,\n    b.example:54\n{\n    whoami\n}\n.:53 {\n}  c.example {\n}\n")
    assert [b.zones for b in blocks] == [
        (("a.example", None), ("b.example", 54)), (("", 53),), (("c.example", None),),
    ]  # fmt: skip
    assert blocks[0].directives == (("whoami", ()),)


def test_snippets_are_not_servers_and_their_directives_count_where_imported() -> None:
    corefile = parse(
        "(common) {\n    cache 30\n    ready\n}\nimport other.conf\n"
        ".:53 {\n    import common\n    import /etc/coredns/extra.conf\n    whoami\n}\n"
    )
    (server,) = corefile.servers
    assert [s.name for s in corefile.snippets] == ["common"]
    assert server.directives == (
        ("cache", ("30",)), ("ready", ()), ("import", ("/etc/coredns/extra.conf",)), ("whoami", ()),
    )  # fmt: skip
    assert [d.arg_texts for d in corefile.imports] == [("other.conf",)]
    assert [d.name.text for d in corefile.top_level_directives()] == [
        "import",
        "import",
        "whoami",
        "cache",
        "ready",
    ]


REFUSED = [
    (". { whoami }\n", "Corefile line 1: the '}' after whoami must start a line"),
    (".:53 {\n    forward . 1.1.1.1 { force_tcp }\n}\n",
     "Corefile line 2: the '}' after force_tcp must start a line"),
    (".:53 {\n    health {\n        lameduck 5s\n    } }\n",
     "Corefile line 4: '}' after the block of health"),
    (".:53 {\n    cache 30\n    {\n    }\n}\n",
     "Corefile line 3: the block of cache must open on its line (line 2)"),
    ("a.example\nb.example {\n}\n", "Corefile line 1: a.example has no block"),
    (".:53{\n}\n", "Corefile line 1: .:53{ has no block"),
    ("a.example, {\n}\n", "Corefile line 1: another key must follow 'a.example,'"),
    (".:53 {\n    cache { } 30\n}\n", "Corefile line 2: '30' after the block of cache must start a line"),
    ("(s) {\n    import s\n}\n.:53 {\n    import s\n}\n", "Corefile line 2: snippet (s) imports itself"),
    ("(s) {\n}\n(s) {\n}\n", "Corefile line 3: snippet (s) is defined twice"),
    (".:53 {\n    import\n}\n", "Corefile line 2: import takes one argument"),
    (".:53 {\n    forward . 1.1.1.1\n", "Corefile line 1: the block of .:53 is not closed"),
    (".:53 {\n}\n}\n", "Corefile line 3: '}' closes no block"),
    ("{\n}\n", "Corefile line 1: '{' without a server block key"),
]  # fmt: skip


@pytest.mark.parametrize(("source", "message"), REFUSED, ids=[m for _, m in REFUSED])
def test_what_coredns_would_refuse_to_group_is_refused_with_the_line(source: str, message: str) -> None:
    with pytest.raises(CorefileError) as info:
        parse(source)
    assert str(info.value).startswith(message)

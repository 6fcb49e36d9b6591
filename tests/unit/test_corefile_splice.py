"""Edits spliced into a Corefile's text at the lexer's offsets: the rest stays byte for byte."""

from __future__ import annotations

from agent.corefile.lexer import lex
from agent.corefile.splice import Splice


def spliced(source: str, *, tidy: bool = True, **at: tuple[int, int, str]) -> str:
    splice = Splice(lex(source))
    splice.drop_comments()
    for start, end, text in at.values():
        splice.replace(start, end, text)
    return splice.text(tidy=tidy)


def test_untouched_text_keeps_its_layout() -> None:
    source = ".:53  {\n\tcache   30\n\n    whoami\n}\n"
    assert spliced(source) == source


def test_a_line_left_empty_by_the_edits_goes_and_a_blank_line_of_the_template_stays() -> None:
    source = "# header\n.:53 {\n\n    errors # why\n    reload\n}\n"
    reload = source.index("reload")
    assert spliced(source, r=(reload, reload + len("reload"), "")) == ".:53 {\n\n    errors\n}\n"


def test_without_tidy_the_whitespace_around_deletions_stays() -> None:
    assert spliced("a # c\n# d\nb\n", tidy=False) == "a \n\nb\n"


def test_a_deletion_across_lines_joins_them_and_keeps_the_line_break_after_it() -> None:
    source = "    forward . U {\n        force_tcp # old\n    }\n    prometheus :9253\n"
    start, end = source.index(" {"), source.index("}") + 1
    assert spliced(source, f=(start, end, "")) == "    forward . U\n    prometheus :9253\n"


def test_whitespace_inside_quotes_at_a_line_end_is_the_strings() -> None:
    source = 'answer "a  \n  b"   \nnext\n'
    assert spliced(source) == 'answer "a  \n  b"\nnext\n'


def test_replacements_and_insertions_inside_a_deleted_span_go_with_it() -> None:
    source = "keep drop this\n"
    splice = Splice(lex(source))
    splice.replace(10, 14, "THAT")
    splice.insert(12, "x")
    splice.delete(4, 14)
    splice.insert(4, "!")
    splice.insert(14, "?")  # at the end of the deleted span: stays
    assert splice.text() == "keep!?\n"

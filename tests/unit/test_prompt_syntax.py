"""The A1111 emphasis parser against A1111's own documented examples (its parse_prompt_attention doctests)."""

from __future__ import annotations

import pytest

from triptych.encoder.prompt_syntax import Fragment, PromptSyntaxError, literal, parse_weighted


def pairs(prompt: str) -> list:
    return [("BREAK" if f.is_break else f.text, f.weight) for f in parse_weighted(prompt)]


@pytest.mark.parametrize(
    "prompt,expected",
    [
        # Verbatim from AUTOMATIC1111 modules/prompt_parser.py, parse_prompt_attention's doctests.
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
    ],
)
def test_a1111_doctests(prompt, expected):
    assert pairs(prompt) == expected


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("[quiet]", [("quiet", 1 / 1.1)]),
        ("[[quiet]]", [("quiet", 1 / 1.1 / 1.1)]),
        ("((loud))", [("loud", 1.1 * 1.1)]),
        ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
        ("(neg:-1)", [("neg", -1.0)]),
        # A1111's re_attention allows blanks around the weight: `:\s*([+-]?[.\d]+)\s*\)`.
        ("a (red: 1.3) cat", [("a ", 1.0), ("red", 1.3), (" cat", 1.0)]),
        ("(red:1.3 )(blue :\t0.5\n)", [("red", 1.3), ("blue ", 0.5)]),
        ("unmatched) and ]", [("unmatched) and ]", 1.0)]),
        ("ratio 3:2", [("ratio 3:2", 1.0)]),
        ("no weight here:1.5)", [("no weight here:1.5)", 1.0)]),
        ("a \\\\ backslash", [("a \\ backslash", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_brackets_escapes_and_literal_colons(prompt, expected):
    assert pairs(prompt) == expected


def test_break_ends_a_chunk_even_inside_brackets():
    assert pairs("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", 1.0), ("a dog", 1.0)]
    # A1111 would weight the marker and read it as the word "break"; ours always breaks.
    assert pairs("(a BREAK b)") == [("a", 1.1), ("BREAK", 1.0), ("b", 1.1)]
    assert pairs("BREAKING news") == [("BREAKING news", 1.0)], "only the whole upper-case word"
    assert pairs("a BREAK BREAK b") == [("a", 1.0), ("BREAK", 1.0), ("", 1.0), ("BREAK", 1.0), ("b", 1.0)]


def test_a_weight_that_is_not_a_number_is_an_error():
    with pytest.raises(PromptSyntaxError, match="1.2.3"):
        parse_weighted("(word:1.2.3)")


def test_literal_reads_every_character_as_text():
    assert literal("(word:1.3) BREAK [x]") == [Fragment("(word:1.3) BREAK [x]", 1.0)]

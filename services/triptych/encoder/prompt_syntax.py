"""A1111 prompt-weighting syntax: text -> fragments, each with a weight, and chunk breaks.

Mirrors AUTOMATIC1111's `prompt_parser.parse_prompt_attention` (same grammar, same order of float
multiplications, same merging of neighbouring fragments with equal weights), with one deliberate difference:
`BREAK` always ends a 75-token chunk, also inside brackets (A1111 multiplies a bracketed BREAK's marker weight
and then reads it as the word "break"). Prompt editing (`[a:b:0.5]`) and alternation (`[a|b]`) are schedules
over steps in A1111, not weights; they are not interpreted here and read as the grammar below says.

    (text)        weight x 1.1            [text]     weight / 1.1
    (text:1.3)    weight x 1.3            nesting    multiplies
    \\( \\) \\[ \\] \\\\   the literal character  BREAK      start a new chunk (a whole word, upper case)
    an unclosed ( or [ applies to the rest of the prompt; an unmatched ) or ] is literal text
"""

from __future__ import annotations

import re
from typing import NamedTuple

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# A1111's re_attention, alternative for alternative: escapes, openers, "(text:weight)" closers, closers,
# plain text, and a lone colon.
_TOKENS = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\] | \\\\ | \\
    | \(
    | \[
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
    | \)
    | ]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


class Fragment(NamedTuple):
    """A run of prompt text with one weight; `is_break` marks a chunk break (its text is empty)."""

    text: str
    weight: float
    is_break: bool = False


class PromptSyntaxError(ValueError):
    """A weight in `(text:weight)` that is not a number."""


def literal(prompt: str) -> list[Fragment]:
    """The whole prompt as one fragment of weight 1: no syntax (diffusers' reading of a prompt)."""
    return [Fragment(prompt, 1.0)]


def parse_weighted(prompt: str) -> list[Fragment]:
    """Parses A1111 emphasis syntax into fragments (see the module docstring); never returns an empty list."""
    fragments: list[list] = []  # [text, weight, is_break], mutable while brackets close
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for item in fragments[start:]:
            if not item[2]:  # a chunk break carries no weight
                item[1] *= multiplier

    for match in _TOKENS.finditer(prompt):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0, False])
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            try:
                value = float(weight)
            except ValueError:
                raise PromptSyntaxError(f"{token[1:-1]!r} in {token!r} is not a number") from None
            multiply_from(round_open.pop(), value)
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    fragments.append(["", 1.0, True])
                fragments.append([part, 1.0, False])
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)
    if not fragments:
        return [Fragment("", 1.0)]
    merged = [fragments[0]]
    for item in fragments[1:]:
        last = merged[-1]
        if not item[2] and not last[2] and item[1] == last[1]:
            last[0] += item[0]
        else:
            merged.append(item)
    return [Fragment(text, weight, is_break) for text, weight, is_break in merged]

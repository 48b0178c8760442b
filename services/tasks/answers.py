"""Whether a reply gives a question's reference answer: normalisation and matching, pure functions.

    references(row)           # the row's `answer` and its `accept` variants, normalised
    mentions(row, reply)      # True when the reply gives one of them

A row carries `answer` (one string) and optionally `accept` (more strings
that are also right: "grey" beside "gray", "Beijing" beside "Peking", any
fruit for "Name a fruit.").

Choices:
1) Normalisation, applied to the reply, the question and every reference
   alike: accents dropped (Brasília = Brasilia); lower case; every character
   but a letter or digit a space (so "hee-haw" = "hee haw", "Bangkok." =
   "bangkok"); number words read as digits, up to 999 ("twelve" = "12",
   "twenty-four" = "twenty four" = "24", "one hundred and eight" = "108");
   then the articles a, an and the dropped. What is left is a list of words.
2) A reference is given when its words appear as consecutive whole words of
   the reply: "The capital of Thailand is Bangkok." gives "bangkok", while
   "12" does not give "2" and "Bangkoks" does not give "bangkok".
3) An echo of the question is not an answer: a reference that is also in the
   question ("What is 11 times 1?" -> 11, "What is the plural of sheep?" ->
   sheep) counts only when the reply says it more often than the question
   does, or ends with it. "11 times 1 is 12" does not give 11; "11", "The
   answer is 11" and "An orange is orange in colour" give theirs.
4) No stemming: "barks" is not "bark" and "boxes" is not "box" (the plural
   questions need the difference), so inflected right answers are listed in
   `accept`.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

ARTICLES = frozenset({"a", "an", "the"})
UNITS = {w: n for n, w in enumerate("zero one two three four five six seven eight nine".split())}
TEENS = {w: n for n, w in enumerate(
    "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split(), start=10)}
TENS = {w: 10 * n for n, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
NOT_WORD = re.compile(r"[^a-z0-9]+")


class MissingAnswer(ValueError):
    """A row has no reference answer to check a reply against."""


def words(text: str) -> list[str]:
    """Choice 1: the text's words after normalisation."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    tokens = NOT_WORD.sub(" ", plain.lower()).split()
    return [w for w in read_numbers(tokens) if w not in ARTICLES]


def read_numbers(tokens: list[str]) -> list[str]:
    """Every run of number words replaced by its digits; other words as they are."""
    out, i = [], 0
    while i < len(tokens):
        value, used = number_at(tokens, i)
        if used:
            out.append(str(value))
            i += used
        else:
            out.append(tokens[i])
            i += 1
    return out


def number_at(tokens: list[str], i: int) -> tuple[int, int]:
    """(value, words used) of the number written in words from tokens[i]; (0, 0) when none starts there.

    Grammar: [unit] "hundred" ["and"] then tens [unit] | teen | unit, either part optional."""
    value, j = 0, i
    at = lambda k: tokens[k] if k < len(tokens) else ""  # noqa: E731
    if at(j) in UNITS and at(j + 1) == "hundred":
        value, j = 100 * UNITS[at(j)], j + 2
    elif at(j) == "hundred":
        value, j = 100, j + 1
    if j > i and at(j) == "and" and (at(j + 1) in UNITS or at(j + 1) in TEENS or at(j + 1) in TENS):
        j += 1
    if at(j) in TENS:
        value, j = value + TENS[at(j)], j + 1
        if at(j) in UNITS and UNITS[at(j)] > 0:
            value, j = value + UNITS[at(j)], j + 1
    elif at(j) in TEENS:
        value, j = value + TEENS[at(j)], j + 1
    elif at(j) in UNITS:
        value, j = value + UNITS[at(j)], j + 1
    return value, j - i


def references(row: dict[str, Any]) -> list[list[str]]:
    """The row's reference answers, normalised; MissingAnswer when it has none."""
    if not row.get("answer"):
        raise MissingAnswer(f"row {question(row)!r} has no `answer` to check a reply against")
    found = [words(str(a)) for a in [row["answer"], *row.get("accept", ())]]
    return [ref for ref in found if ref]


def question(row: dict[str, Any]) -> str:
    if "prompt" in row:
        return str(row["prompt"])
    turns = [m["content"] for m in row.get("messages", []) if m.get("role") == "user"]
    return turns[-1] if turns else ""


def count(phrase: list[str], text: list[str]) -> int:
    n = len(phrase)
    return sum(text[k:k + n] == phrase for k in range(len(text) - n + 1))


def mentions(row: dict[str, Any], reply: str) -> bool:
    """Choices 2 and 3: the reply gives one of the row's reference answers."""
    said, asked = words(reply), words(question(row))
    for ref in references(row):
        times = count(ref, said)
        if times and (times > count(ref, asked) or said[-len(ref):] == ref):
            return True
    return False

"""Verifiers: decide whether a decoded response answers a record correctly.

A verifier is ``(response: str, answer: str) -> bool``. ``parse_answer`` lets the data module
check before training that every gold answer is something the verifier can read.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Verifier = Callable[[str, str], bool]


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def exact_match(response: str, answer: str) -> bool:
    """Equal after whitespace normalisation (case-sensitive: the world's symbols are)."""
    return normalize_whitespace(response) == normalize_whitespace(answer)


class RegexVerifier:
    """Extract the answer with a regex (first group, else whole match) and compare exactly.

    ``pattern`` is applied to the response; the gold answer is compared as given unless
    ``apply_to_answer`` is set (then both sides are extracted).
    """

    def __init__(self, pattern: str = r"(?:answer is|Answer:)\s*([^\s.]+)", apply_to_answer: bool = False):
        self.pattern = re.compile(pattern, re.IGNORECASE)
        self.apply_to_answer = apply_to_answer

    def extract(self, text: str) -> str | None:
        matches = list(self.pattern.finditer(text))
        if not matches:
            return None
        m = matches[-1]  # the final stated answer wins over earlier reasoning
        return normalize_whitespace(m.group(1) if m.groups() else m.group(0))

    def parse_answer(self, answer: str) -> str | None:
        return self.extract(answer) if self.apply_to_answer else normalize_whitespace(answer) or None

    def __call__(self, response: str, answer: str) -> bool:
        got = self.extract(response)
        want = self.parse_answer(answer)
        return got is not None and want is not None and got == want


class ChoiceVerifier:
    """Multiple choice: the option letter (A-J) the response commits to vs the gold letter.

    Read in order of commitment: an explicit "answer is X" / "Answer: X" (the last one wins), then a
    response that starts with the letter ("B", "B)", "(B) ..."), then a lone letter standing by itself.
    A capital that opens a word ("A patient ...", "I think") is never read as an option.
    """

    _explicit = re.compile(r"(?:answer|option)\s*(?:is|:)?\s*:?\s*\(?([A-J])\b(?![a-z])", re.IGNORECASE)
    _leading = re.compile(r"^\s*[\(\[]?([A-J])(?:$|[).\]:,]|\s+(?![a-z]))")
    _lone = re.compile(r"(?:^|[\s(\[])([A-J])(?=$|[).\]:,]|\s+(?:$|[^a-z]))")

    def __init__(self, letters: str = "ABCDEFGHIJ"):
        self.letters = letters

    def extract(self, text: str) -> str | None:
        text = text.strip()
        explicit = [m.group(1).upper() for m in self._explicit.finditer(text)]
        for candidate in reversed(explicit):
            if candidate in self.letters:
                return candidate
        for pattern in (self._leading, self._lone):
            m = pattern.search(text)
            if m and m.group(1) in self.letters:
                return m.group(1)
        return None

    def parse_answer(self, answer: str) -> str | None:
        a = answer.strip().upper()
        return a if len(a) == 1 and a in self.letters else self.extract(answer)

    def __call__(self, response: str, answer: str) -> bool:
        got = self.extract(response)
        return got is not None and got == self.parse_answer(answer)


_ANY_TAG = re.compile(r"<\s*/?\s*answer\s*>", re.IGNORECASE)


def extract_tagged(text: str, tag: str = "answer") -> str | None:
    """The stripped text inside the one ``<answer>...</answer>`` of ``text``; None when the format is not met.

    Strict on purpose (an unparseable response counts as wrong; the verifier never guesses): exactly one
    opening and one closing tag, both written exactly ``<answer>`` / ``</answer>`` (lowercase, no spaces),
    the opening one first. Any other spelling of the tag (``<Answer>``, ``< answer >``) counts as a second,
    malformed tag. Text before the tag (the analysis) and after it (a closing remark) is allowed.
    """
    pattern = _ANY_TAG if tag == "answer" else re.compile(rf"<\s*/?\s*{re.escape(tag)}\s*>", re.IGNORECASE)
    found = list(pattern.finditer(text))
    if len(found) != 2 or found[0].group(0) != f"<{tag}>" or found[1].group(0) != f"</{tag}>":
        return None
    return text[found[0].end():found[1].start()].strip()


def last_tagged(text: str, tag: str = "answer", *, ignore_case: bool = True) -> str | None:
    """The text inside the *last* ``<answer>...</answer>`` pair of ``text``, unstripped; None when there is no pair.

    Lenient on purpose, as OPCD's scorer reads its tags (``re.findall`` of a lazy ``<answer>([\\s\\S]*?)</answer>``,
    last match): pairs are found left to right, each opening tag closed by the nearest closing tag after it, so
    ``<answer>a <answer>b</answer>`` is one pair holding ``a <answer>b``, and an opening tag that is never closed
    (the second one of ``<answer>a</answer> <answer>b``) opens no pair. ``ignore_case`` lets the tag be written in
    any case (``<ANSWER>``); a tag with spaces inside (``< answer >``) never counts.
    """
    name = re.escape(tag)
    found = re.findall(rf"<{name}>([\s\S]*?)</{name}>", text, re.IGNORECASE if ignore_case else 0)
    return found[-1] if found else None


def _exact_parse(answer: str) -> str | None:
    return normalize_whitespace(answer) or None


GENERIC_VERIFIERS = ("exact", "regex", "choice")


def build_verifier(name: str, **kwargs) -> Verifier:
    """``exact`` | ``regex`` | ``choice``, or ``module:attr``: any verifier by import path (a class is built with
    ``kwargs``, a function is used as it is). A task's own verifier comes with the task (``Task.verifier``)."""
    if name == "exact":
        return exact_match
    if name == "regex":
        return RegexVerifier(**kwargs)
    if name == "choice":
        return ChoiceVerifier(**kwargs)
    verifier = import_verifier(name)
    if verifier is None:
        raise ValueError(f"unknown verifier {name!r}; choose one of {', '.join(GENERIC_VERIFIERS)} or give an import "
                         "path module:attr")
    return verifier(**kwargs) if isinstance(verifier, type) else verifier


def import_verifier(spec: str):
    """The object ``module:attr`` names, or None when ``spec`` is not such a path or does not import."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        return None
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None


def verifier_known(spec: str) -> bool:
    """A generic verifier's name, or an import path that imports to something callable."""
    return spec in GENERIC_VERIFIERS or callable(import_verifier(spec))


def answer_parser(verifier: Verifier) -> Callable[[str], object]:
    """The function that reads a gold answer for ``verifier`` (None = unreadable)."""
    parse = getattr(verifier, "parse_answer", None)
    return parse if parse is not None else _exact_parse

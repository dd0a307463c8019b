r"""Multiple-choice reward: the letter a completion settles on, compared with the gold letter.

``extract_choice`` looks, in order, for:

1. explicit answer statements, taking the one that appears LAST in the text: ``\boxed{B}``, "the answer is (B)",
   "answer: b", "Answer: **D**", "the correct option is C", "I choose A", "Final answer: B) 42",
   "(C) is correct", "option B is the right answer", ...;
2. without any statement: a reply that is only a letter ("B.", "(C)", "**d**"), a last line that is one
   ("... so\n(C)"), a first line that starts with one followed by a delimiter and the option text ("B) 42",
   "C. Paris"), and finally the last mention of a capital letter in brackets or after "option"/"choice"
   ("... so (C) fits", "42, which is option C").

A lowercase letter counts only where it stands alone (in brackets, or followed by nothing but punctuation up to
the end of its line), so "the answer is a bit tricky" and "A cat is a mammal" yield nothing; an uppercase "I"
followed by a lowercase word is the pronoun, not choice I. Valid letters default to A-D (``valid_letters="ABCDEFGHIJ"``
for ten options).

Every pattern runs in time linear in the text (see ``_DECOR``), and a completion longer than ``MAX_CHOICE_CHARS``
is read as its start and its end.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nemo_logitavg.rewards.math_answer import find_last_boxed

DEFAULT_LETTERS = "ABCD"

MAX_CHOICE_CHARS = 32_768
"""A longer completion is read as its first ``_HEAD_CHARS`` and its last ``MAX_CHOICE_CHARS - _HEAD_CHARS``
characters: answers are stated at the end, and the first-line rule needs only the start. Extraction is linear in
what it reads, so this bounds its time in the trainer's process (a few tens of milliseconds on one core), as the
math grader's caps and time limit bound math-verify. The shipped configs' 3072-token completions are about 12k
characters at 4 characters a token."""
_HEAD_CHARS = 1024

# What may stand between an answer marker and the letter: spaces, markdown emphasis, quotes, math delimiters,
# opening brackets and LaTeX text wrappers.
#
# Every run of whitespace or decoration is possessive (``*+``, ``++``): several adjacent runs that could share the
# same spaces ("answer" + 800 spaces) otherwise make the regex engine try every split, in time cubic in the run.
# A letter or a word always ends a run, so no match is lost by not giving characters back.
_DECOR = r"(?:[\s\*_\"'`$\(\[\{:]|\\(?:text|textbf|mathrm|mathbf|boxed)\s*+\{)*+"
_LETTER = r"(?P<letter>[A-Za-z])(?![A-Za-z0-9])"
_ADVERB = r"(?:(?:most\s++)?(?:likely|probably|clearly|definitely|certainly|therefore|thus|indeed|actually)\s*+,?\s*+)?"
_VERB = r"(?:[^.\n:]{0,40}?\b(?:is|be)\b)?\s*+[:=\-\u2013]?\s*+" + _ADVERB + r"(?:\b(?:option|choice|letter)\b)?"

_MARKERS = [
    # "answer: B", "The answer is (B)", "Final answer: B) 42", "the answer to this question is B"
    re.compile(r"\banswer\b" + _VERB + _DECOR + _LETTER, re.IGNORECASE),
    # "the correct option is C", "best choice: D", "correct answer choice is B"
    re.compile(
        r"\b(?:correct|right|best|final)\s++(?:answer\s++)?(?:option|choice|letter|selection)\b"
        + _VERB
        + _DECOR
        + _LETTER,
        re.IGNORECASE,
    ),
    # "I choose A", "I'll go with C", "I would pick option D", "select B"
    re.compile(
        r"\b(?:choose|chose|pick|select|go\s++with|opt\s++for)\s++(?:\b(?:option|choice|answer|letter)\b)?"
        + _DECOR
        + _LETTER,
        re.IGNORECASE,
    ),
    # "(C) is correct", "Option B is the correct answer", "B is the right choice" (capital letter only). A run of
    # brackets is entered only at its start, or "(((...(" would be rescanned from each of its characters.
    re.compile(
        r"(?:\b(?i:option|choice|answer)\s*+)?(?<![\(\[\*])[\(\[\*]*+(?<![A-Za-z])(?P<letter>[A-Z])[\)\]\*]*+\s++"
        r"(?i:is|seems\s++to\s++be|appears\s++to\s++be)\s++(?i:the\s++)?(?i:correct|right|best|answer)\b"
    ),
]
_ONLY_LETTER = re.compile(r"^[\W_]*+(?P<letter>[A-Za-z])[\W_]*+$")
_LEADING_LETTER = re.compile(r"^[\s\*\(\[]*+(?:(?P<upper>[A-Z])[\)\]\.:]|(?P<lower>[a-z])[\)\]])[\*]*(?:\s|$)")
_MENTIONED_LETTER = re.compile(r"\((?P<paren>[A-Z])\)|\b(?i:option|choice)\s++\(?(?P<named>[A-Z])(?![A-Za-z0-9])")
_BOXED_LETTER = re.compile(r"^[\s\(\[\*$]*(?P<letter>[A-Za-z])(?![A-Za-z])")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
_STANDS_ALONE_AFTER = re.compile(r"[\)\]\}\*_\"'`$.,;:!?]*+[ \t]*+(?:\n|$)")


def _accept(text: str, start: int, letter: str, valid: str) -> bool:
    """Whether ``letter`` found at ``text[start]`` is a choice rather than part of a word, an article or "I"."""
    if letter.upper() not in valid:
        return False
    after = text[start + 1 : start + 2]
    if after.isalnum():
        return False
    bracketed = start > 0 and text[start - 1] in "([{"
    alone = _STANDS_ALONE_AFTER.match(text, start + 1) is not None
    if letter.islower():
        return bracketed or alone
    if letter == "I" and not bracketed and re.match(r"\s+[a-z']", text[start + 1 : start + 4]):
        return False  # the pronoun
    return True


def _boxed_choice(text: str, valid: str) -> tuple[int, str] | None:
    status, content = find_last_boxed(text, 200)
    if status != "ok":
        return None
    for _ in range(3):  # \text{\textbf{B}} nests at most a few wrappers deep
        content = _TEXT_WRAPPER.sub(r"\1", content)
    match = _BOXED_LETTER.match(content)
    if match is None or match.group("letter").upper() not in valid:
        return None
    rest = content[match.end() :].strip()
    if match.group("letter").islower() and rest.strip(")].*$") != "":
        return None
    return max(text.rfind("\\boxed"), text.rfind("\\fbox")), match.group("letter").upper()


def _line_choice(line: str, valid: str) -> str | None:
    match = _ONLY_LETTER.match(line)
    if match and match.group("letter").upper() in valid:
        return match.group("letter").upper()
    match = _LEADING_LETTER.match(line)
    if match:
        letter = (match.group("upper") or match.group("lower")).upper()
        if letter in valid:
            return letter
    return None


def extract_choice(text: str, valid_letters: str = DEFAULT_LETTERS) -> str | None:
    """The option letter (uppercase) that ``text`` settles on, or None. See the module docstring for the rules."""
    valid = valid_letters.upper()
    if len(text) > MAX_CHOICE_CHARS:
        text = text[:_HEAD_CHARS] + "\n" + text[len(text) - (MAX_CHOICE_CHARS - _HEAD_CHARS) :]
    candidates: list[tuple[int, str]] = []
    boxed = _boxed_choice(text, valid)
    if boxed is not None:
        candidates.append(boxed)
    for pattern in _MARKERS:
        for match in pattern.finditer(text):
            start = match.start("letter")
            letter = match.group("letter")
            if _accept(text, start, letter, valid):
                candidates.append((start, letter.upper()))
    if candidates:
        return max(candidates)[1]

    stripped = text.strip()
    if not stripped:
        return None
    lines = [line for line in stripped.splitlines() if line.strip()]
    for line in (stripped, lines[-1], lines[0]):
        letter = _line_choice(line, valid)
        if letter is not None:
            return letter
    for match in reversed(list(_MENTIONED_LETTER.finditer(text))):
        letter = match.group("paren") or match.group("named")
        if letter in valid:
            return letter
    return None


def _gold_letter(gold: str, valid: str) -> str:
    match = _ONLY_LETTER.match(gold.strip())
    if match is None or match.group("letter").upper() not in valid:
        raise ValueError(f"gold answer {gold!r} is not one of the letters {valid}")
    return match.group("letter").upper()


def score_mcq(
    completions: Sequence[str], gold_letters: Sequence[str], valid_letters: str = DEFAULT_LETTERS
) -> list[float]:
    """1.0 where the extracted choice equals the gold letter (case-insensitive, "(B)" accepted), else 0.0."""
    if len(completions) != len(gold_letters):
        raise ValueError(f"{len(completions)} completions but {len(gold_letters)} gold letters")
    valid = valid_letters.upper()
    golds = [_gold_letter(gold, valid) for gold in gold_letters]
    return [1.0 if extract_choice(text, valid) == gold else 0.0 for text, gold in zip(completions, golds, strict=True)]

r"""Format metrics of a completion: a final ``\boxed{}``, whether its LaTeX is well formed, whether it ended by EOS;
for a multiple-choice reply, whether it states an option letter (``letter_answer``).

``boxed_latex_valid`` is true when the last box's content

1. is non-empty, at most ``MAX_ANSWER_CHARS`` long and nests brackets at most ``MAX_NESTING_DEPTH`` deep;
2. has balanced braces (escaped ``\{ \}`` aside), ``\left``/``\right`` pairs that match in order, and matching
   ``\begin{env}``/``\end{env}``;
3. is turned into a SymPy object by math-verify's LaTeX extraction (its normalisation, then latex2sympy2's ANTLR
   grammar), the parser that grades the answer, so "valid" means "the grader can read it".

Step 3 runs in the grader's worker pool under its time limit (a timeout counts as invalid): the ANTLR parser takes
seconds on a dozen nested groups, too slow to trust in the trainer's process. Steps 1-2 run in the caller and
spare the pool whatever they reject.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nemo_logitavg.rewards.math_answer import (
    MAX_ANSWER_CHARS,
    MAX_NESTING_DEPTH,
    MathGrader,
    find_last_boxed,
    get_default_grader,
    nesting_depth,
)
from nemo_logitavg.rewards.mcq import DEFAULT_LETTERS, extract_choice

_STRUCTURE_TOKEN = re.compile(
    r"\\[\\{}]|[{}]|\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\(?P<kind>begin|end)\s*\{(?P<env>[^{}]*)\}"
)


def latex_structure_ok(latex: str) -> bool:
    r"""Steps 1-2 above: non-empty, not too long or deep, balanced braces, ``\left``/``\right`` and environments."""
    if not latex.strip() or len(latex) > MAX_ANSWER_CHARS or nesting_depth(latex) > MAX_NESTING_DEPTH:
        return False
    stack: list[str] = []
    for token in _STRUCTURE_TOKEN.finditer(latex):
        text = token.group()
        if token.group("kind") == "begin":
            stack.append("env:" + token.group("env").strip())
        elif token.group("kind") == "end":
            if not stack or stack.pop() != "env:" + token.group("env").strip():
                return False
        elif text == "{":
            stack.append("{")
        elif text == "}":
            if not stack or stack.pop() != "{":
                return False
        elif text.startswith("\\left"):
            stack.append("left")
        elif text.startswith("\\right"):
            if not stack or stack.pop() != "left":
                return False
    return not stack


def format_metrics_batch(
    completions: Sequence[str],
    finish_reasons: Sequence[str | None] | None = None,
    *,
    grader: MathGrader | None = None,
    timeout: float | None = None,
) -> list[dict[str, bool]]:
    """``format_metrics`` for many completions, parsing all boxes in one parallel call to the pool."""
    if finish_reasons is None:
        finish_reasons = [None] * len(completions)
    if len(finish_reasons) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(finish_reasons)} finish reasons")
    metrics, to_parse, where = [], [], []
    for index, (completion, reason) in enumerate(zip(completions, finish_reasons, strict=True)):
        status, content = find_last_boxed(completion, MAX_ANSWER_CHARS)
        metrics.append(
            {"has_boxed": status in ("ok", "too_long"), "boxed_latex_valid": False, "ended_by_eos": reason == "stop"}
        )
        if status == "ok" and latex_structure_ok(content):
            to_parse.append(content.strip())
            where.append(index)
    if to_parse:
        grader = grader or get_default_grader()
        parsed, _ = grader.check_latex(to_parse, timeout=timeout)
        for index, ok in zip(where, parsed, strict=True):
            metrics[index]["boxed_latex_valid"] = ok
    return metrics


def format_metrics(
    completion: str, finish_reason: str | None = None, *, grader: MathGrader | None = None
) -> dict[str, bool]:
    r"""``has_boxed`` (a closed final ``\boxed{}``/``\fbox{}`` exists), ``boxed_latex_valid`` (see the module
    docstring) and ``ended_by_eos`` (``finish_reason == "stop"``). A box whose content is longer than
    ``MAX_ANSWER_CHARS`` counts as present (its end is not searched for) and invalid."""
    return format_metrics_batch([completion], [finish_reason], grader=grader)[0]


def letter_answer(completion: str, valid_letters: str = DEFAULT_LETTERS) -> bool:
    r"""Letter-answer adherence of a multiple-choice reply: it settles on one of ``valid_letters``, in a form the
    grader reads (``extract_choice`` finds a letter: ``\boxed{B}``, "Answer: B", ...), right or wrong."""
    return extract_choice(completion, valid_letters) is not None

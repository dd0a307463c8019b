"""Grade a batch that mixes reward kinds: each completion by its own record's kind (``math`` or ``mcq``)."""

from __future__ import annotations

from collections.abc import Sequence

from nemo_logitavg.rewards.math_answer import GRADE_TIMEOUT, score_math
from nemo_logitavg.rewards.mcq import score_mcq

REWARD_KINDS = ("math", "mcq")


def score_by_kind(
    completions: Sequence[str], gold_answers: Sequence[str], kinds: Sequence[str], math_timeout: float = GRADE_TIMEOUT
) -> list[float]:
    """``score_math`` for the completions whose kind is ``math``, ``score_mcq`` for ``mcq``, in input order.

    One call per kind, so the math grader's worker pool grades all math answers of the batch in parallel.

    Raises:
        ValueError: lengths differ, or a kind is not one of ``REWARD_KINDS``.
    """
    if not len(completions) == len(gold_answers) == len(kinds):
        raise ValueError(f"{len(completions)} completions, {len(gold_answers)} gold answers, {len(kinds)} kinds")
    unknown = sorted(set(kinds) - set(REWARD_KINDS))
    if unknown:
        raise ValueError(f"unknown reward kinds {unknown}; expected one of {REWARD_KINDS}")
    scores = [0.0] * len(completions)
    for kind in REWARD_KINDS:
        index = [i for i, k in enumerate(kinds) if k == kind]
        if not index:
            continue
        texts, golds = [completions[i] for i in index], [gold_answers[i] for i in index]
        part = score_math(texts, golds, timeout=math_timeout) if kind == "math" else score_mcq(texts, golds)
        for i, score in zip(index, part, strict=True):
            scores[i] = float(score)
    return scores

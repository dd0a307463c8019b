"""Verifiable rewards for GRPO: math answers (math-verify in a worker pool), multiple-choice letters, format metrics.

Imports nothing else of the package. math-verify is imported only inside the grading worker processes.
"""

from nemo_logitavg.rewards.by_kind import REWARD_KINDS, score_by_kind
from nemo_logitavg.rewards.format import format_metrics, format_metrics_batch, latex_structure_ok, letter_answer
from nemo_logitavg.rewards.math_answer import (
    GRADE_TIMEOUT,
    MAX_ANSWER_CHARS,
    MAX_FALLBACK_CHARS,
    MAX_NESTING_DEPTH,
    GradeStats,
    MathGrader,
    extract_last_boxed,
    get_default_grader,
    score_math,
)
from nemo_logitavg.rewards.mcq import extract_choice, score_mcq

__all__ = [
    "GRADE_TIMEOUT",
    "MAX_ANSWER_CHARS",
    "MAX_FALLBACK_CHARS",
    "MAX_NESTING_DEPTH",
    "REWARD_KINDS",
    "GradeStats",
    "MathGrader",
    "extract_choice",
    "extract_last_boxed",
    "format_metrics",
    "format_metrics_batch",
    "get_default_grader",
    "latex_structure_ok",
    "letter_answer",
    "score_by_kind",
    "score_math",
    "score_mcq",
]

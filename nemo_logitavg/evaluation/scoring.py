"""Scoring completions and summarising runs: per-problem rewards and format metrics, a run's accuracy with its
bootstrap interval, the across-seed aggregate and the paired comparison with a baseline.

Metrics (per model, sampling mode, dataset and seed). Each problem gets ``k`` completions; its score is the mean
reward over them (pass@1 estimated from k samples) and accuracy is the mean over problems. The 95% interval is a
percentile bootstrap over problems (``stats.bootstrap_ci``). Each completion is graded by its record's reward
(``score_math`` or ``score_mcq``). Format metrics are fractions of completions: ``has_boxed``,
``boxed_latex_valid``, ``ended_by_eos``, and for multiple-choice records ``letter_answer`` (the reply states an
option letter the grader reads; absent where a run has no such record); ``mean_length`` is in tokens. Across
seeds, ``aggregate`` reports the mean and the sample standard deviation (ddof 1) of each seed's accuracy, and the
bootstrap interval of the per-problem scores averaged over seeds. Greedy decoding (temperature 0, the headline of
docs/design.md §7) is deterministic, so a greedy mode runs once whatever the seeds.

By type. ``accuracy_by_type`` splits each model's accuracy by problem type (where training changed the model).

Comparison. ``compare`` pairs each run with a baseline run on the same problems: the difference of accuracies
and the paired-bootstrap 95% interval of that difference (the same resampled problems for both). "Above the
baseline beyond the CI" means that interval lies above 0 (``verdict == "above"``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from nemo_logitavg.evaluation.stats import bootstrap_ci, interval_verdict, paired_bootstrap
from nemo_logitavg.rewards import GRADE_TIMEOUT, format_metrics_batch, letter_answer, score_by_kind

FORMAT_KEYS = ("has_boxed", "boxed_latex_valid", "ended_by_eos")
LETTER_KEY = "letter_answer"  # a format metric of multiple-choice records only


@dataclass
class SamplingMode:
    """One way to decode: ``greedy`` (k=1, temperature 0) is the headline, ``sampled`` (k=4, temperature 1)
    secondary."""

    name: str
    k: int
    temperature: float
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingMode("greedy", 1, 0.0)
SAMPLED = SamplingMode("sampled", 4, 1.0)


@dataclass
class Run:
    """One evaluation: a model, a sampling mode, a dataset (record ``source``) and a seed."""

    model: str
    mode: str
    dataset: str
    seed: int
    summary: dict
    rows: list[dict] = field(repr=False)

    def per_problem(self) -> dict[str, float]:
        return {r["id"]: r["score"] for r in self.rows}


def score_records(
    records: Sequence[dict], completions: Sequence[Sequence], math_timeout: float = GRADE_TIMEOUT
) -> list[dict]:  # fmt: skip
    """Per-problem rows: ``completions[i]`` are record i's completions (objects with ``text``, ``token_ids``,
    ``finish_reason``). Each row holds the rewards, format metrics and lengths of its k completions."""
    flat_text, flat_reason, flat_gold, flat_kind = [], [], [], []
    for record, group in zip(records, completions, strict=True):
        for completion in group:
            flat_text.append(completion.text)
            flat_reason.append(completion.finish_reason)
            flat_gold.append(record["answer"])
            flat_kind.append(record["reward"])
    rewards = score_by_kind(flat_text, flat_gold, flat_kind, math_timeout=math_timeout)
    formats = format_metrics_batch(flat_text, flat_reason, timeout=math_timeout) if flat_text else []
    rows, pos = [], 0
    for record, group in zip(records, completions, strict=True):
        k = len(group)
        part = slice(pos, pos + k)
        rows.append(
            {
                "id": record["id"],
                "source": record["source"],
                "answer": record["answer"],
                "rewards": rewards[part],
                "score": float(np.mean(rewards[part])) if k else 0.0,
                "lengths": [len(c.token_ids) for c in group],
                **{key: [bool(f[key]) for f in formats[part]] for key in FORMAT_KEYS},
                "completions": [c.text for c in group],
                "finish_reasons": [c.finish_reason for c in group],
            }
        )
        if record["reward"] == "mcq":
            rows[-1][LETTER_KEY] = [letter_answer(c.text) for c in group]
        pos += k
    return rows


def summarize(rows: Sequence[dict], num_resamples: int = 10_000, seed: int = 0) -> dict:
    """Accuracy (mean pass@1 over k), its bootstrap 95% interval over problems, format fractions, mean length."""
    scores = np.array([r["score"] for r in rows], dtype=np.float64)
    low, high = bootstrap_ci(scores, 0.95, num_resamples, seed)
    summary = {
        "num_problems": len(rows),
        "k": max((len(r["rewards"]) for r in rows), default=0),
        "accuracy": float(scores.mean()),
        "ci_low": low,
        "ci_high": high,
    }
    for key in FORMAT_KEYS:
        summary[key] = float(np.mean([v for r in rows for v in r[key]]))
    letters = [v for r in rows for v in r.get(LETTER_KEY, ())]
    if letters:
        summary[LETTER_KEY] = float(np.mean(letters))
    summary["mean_length"] = float(np.mean([v for r in rows for v in r["lengths"]]))
    return summary


def aggregate(runs: Sequence[Run], num_resamples: int = 10_000) -> list[dict]:
    """One row per (model, mode, dataset): mean and std (ddof 1; 0 for one seed) of the seeds' accuracies, the
    bootstrap interval of the seed-averaged per-problem scores, mean format fractions and length."""
    rows = []
    for (model, mode, dataset), group in _group(runs).items():
        accuracies = np.array([r.summary["accuracy"] for r in group])
        ids, matrix = _aligned(group)
        low, high = bootstrap_ci(matrix.mean(axis=1), 0.95, num_resamples, 0)
        row = {
            "model": model,
            "mode": mode,
            "dataset": dataset,
            "num_seeds": len(group),
            "num_problems": len(ids),
            "k": group[0].summary["k"],
            "accuracy_mean": float(accuracies.mean()),
            "accuracy_std": float(accuracies.std(ddof=1)) if len(group) > 1 else 0.0,
            "ci_low": low,
            "ci_high": high,
        }
        for key in (*FORMAT_KEYS, "mean_length"):
            row[key] = float(np.mean([r.summary[key] for r in group]))
        if all(LETTER_KEY in r.summary for r in group):
            row[LETTER_KEY] = float(np.mean([r.summary[LETTER_KEY] for r in group]))
        rows.append(row)
    return rows


def _aligned(group: Sequence[Run]) -> tuple[list[str], np.ndarray]:
    """Problem ids and the ``[problems, runs]`` matrix of per-problem scores (runs must cover the same ids)."""
    ids = sorted(group[0].per_problem())
    columns = []
    for run in group:
        scores = run.per_problem()
        if sorted(scores) != ids:
            raise ValueError(f"runs of {run.model}/{run.mode}/{run.dataset} cover different problems")
        columns.append([scores[i] for i in ids])
    return ids, np.array(columns, dtype=np.float64).T


def compare(runs: Sequence[Run], baseline: str, num_resamples: int = 10_000, seed: int = 0) -> list[dict]:
    """Each model against ``baseline`` per (mode, dataset): accuracies (averaged over seeds), their difference and
    its paired-bootstrap 95% interval over the problems both were evaluated on; ``verdict`` is ``above`` /
    ``below`` when the interval excludes 0, else ``within CI`` (``stats.interval_verdict``)."""
    by_key: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for (model, mode, dataset), group in _group(runs).items():
        ids, matrix = _aligned(group)
        by_key.setdefault((mode, dataset), {})[model] = dict(zip(ids, matrix.mean(axis=1), strict=True))
    rows = []
    for (mode, dataset), models in by_key.items():
        if baseline not in models:
            continue
        base = models[baseline]
        for model, scores in models.items():
            common = sorted(set(scores) & set(base))
            a = np.array([scores[i] for i in common])
            b = np.array([base[i] for i in common])
            diff, low, high = paired_bootstrap(a, b, 0.95, num_resamples, seed) if common else (math.nan,) * 3
            rows.append(
                {
                    "model": model, "mode": mode, "dataset": dataset, "baseline": baseline,
                    "num_problems": len(common), "accuracy": float(a.mean()) if common else math.nan,
                    "baseline_accuracy": float(b.mean()) if common else math.nan,
                    "diff": diff, "diff_ci_low": low, "diff_ci_high": high,
                    "verdict": "baseline" if model == baseline else interval_verdict(low, high),
                }
            )  # fmt: skip
    return rows


def accuracy_by_type(types: Mapping[str, str], samples: Mapping[str, Iterable[dict]]) -> list[dict]:
    """Accuracy per problem type of every model and mode: one row per (model, mode), sampled runs averaged over
    their seeds. ``types`` maps a problem id to its type (the column names say how many problems each type has);
    ``samples`` maps a model name to its per-problem rows (``mode``, ``id``, ``score``; e.g. ``samples.jsonl``)."""
    count = {t: list(types.values()).count(t) for t in set(types.values())}
    rows = []
    for name, model_samples in samples.items():
        scores: dict[str, dict[str, list[float]]] = {}
        for sample in model_samples:
            scores.setdefault(sample["mode"], {}).setdefault(types[sample["id"]], []).append(sample["score"])
        for mode, per_type in scores.items():
            row: dict = {"model": name, "mode": mode}
            row.update({f"{t} ({count[t]})": sum(v) / len(v) for t, v in sorted(per_type.items())})
            rows.append(row)
    return rows


def _group(runs: Sequence[Run]) -> dict[tuple[str, str, str], list[Run]]:
    """Runs by (model, mode, dataset), in the order they first appear."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.model, run.mode, run.dataset), []).append(run)
    return groups


__all__ = [
    "FORMAT_KEYS",
    "GREEDY",
    "LETTER_KEY",
    "SAMPLED",
    "Run",
    "SamplingMode",
    "accuracy_by_type",
    "aggregate",
    "compare",
    "score_records",
    "summarize",
]

r"""The reproduction job's report (``configs/paper_cpu.yaml``): error bars across training runs.

Input: the greedy summary (``scoring.summarize``: accuracy, format fractions) of every trained model per benchmark
and training seed, ``per_seed[benchmark][method][seed]``, and the SFT model's per benchmark (one model: the seeds
retrain GRPO, not SFT). Everything across seeds uses ``stats``:

- per method, the mean accuracy over training seeds with its 95% t-interval (``seed_t_interval``);
- per method, the paired difference to SFT and to KL-GRPO across seeds (``paired_seed_difference``, seeds matched:
  the same training seed gives both methods the same rollout seeds) with its verdict (``above`` / ``below`` when
  the interval excludes 0), and the smallest difference the design could detect at that spread
  (``minimum_detectable_difference``: two-sided alpha 0.05, power 0.8, paired);
- format metrics per method (means over seeds): boxed adherence, LaTeX validity, letter-answer adherence
  (multiple-choice benchmarks), ended by EOS;
- the ablation plot per benchmark (accuracy against ref_weight, seed intervals as bars, KL-GRPO and SFT levels as
  lines, ``reports.plot_ablation``) and the per-seed table (``reports.seed_table``).

Data in, files out, like ``reports``: ``job_report`` gathers the summaries.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from nemo_logitavg.evaluation.reports import plot_ablation, run_sections, seed_table
from nemo_logitavg.evaluation.scoring import FORMAT_KEYS, LETTER_KEY
from nemo_logitavg.evaluation.stats import (
    interval_verdict,
    minimum_detectable_difference,
    paired_seed_difference,
    seed_t_interval,
)
from nemo_logitavg.tables import markdown_table

ALPHA, POWER = 0.05, 0.8  # of the smallest detectable difference


def _sd(values: Sequence[float]) -> float:
    """The sample standard deviation (ddof 1); NaN for one value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def accuracies(per_seed: Mapping[str, Mapping[int, dict]]) -> dict[str, dict[int, float]]:
    """``method -> seed -> accuracy`` of one benchmark's ``per_seed`` summaries."""
    return {method: {s: float(v["accuracy"]) for s, v in by_seed.items()} for method, by_seed in per_seed.items()}


def across_seed_rows(
    per_seed: Mapping[str, Mapping[str, Mapping[int, dict]]], sft: Mapping[str, dict], labels: Mapping[str, str]
) -> list[dict]:
    """A row per (benchmark, method): training seeds, mean accuracy, its across-seed standard deviation and 95%
    t-interval; the SFT model's row has one model and no interval."""
    rows = []
    for benchmark, by_method in per_seed.items():
        rows.append({"benchmark": labels.get(benchmark, benchmark), "method": "sft", "seeds": 1,
                     "mean": float(sft[benchmark]["accuracy"]), "sd": math.nan, "t_low": math.nan,
                     "t_high": math.nan})  # fmt: skip
        for method, values in accuracies(by_method).items():
            x = [values[s] for s in sorted(values)]
            mean, low, high = seed_t_interval(x)
            rows.append({"benchmark": labels.get(benchmark, benchmark), "method": method, "seeds": len(x),
                         "mean": mean, "sd": _sd(x), "t_low": low, "t_high": high})  # fmt: skip
    return rows


def paired_rows(
    per_seed: Mapping[str, Mapping[str, Mapping[int, dict]]], sft: Mapping[str, dict], kl_method: str | None,
    labels: Mapping[str, str],
) -> list[dict]:  # fmt: skip
    """A row per (benchmark, method, reference): the per-seed differences' mean, 95% paired t-interval, standard
    deviation, verdict, and the smallest difference detectable with that many seeds at that spread. References:
    SFT (the same model at every seed) and ``kl_method`` (matched by training seed)."""
    rows = []
    for benchmark, by_method in per_seed.items():
        acc = accuracies(by_method)
        references = {"sft": None} | ({kl_method: acc[kl_method]} if kl_method in acc else {})
        for method, values in acc.items():
            for against, ref in references.items():
                if against == method:
                    continue
                ref = ref if ref is not None else {s: float(sft[benchmark]["accuracy"]) for s in values}
                mean, low, high = paired_seed_difference(values, ref)
                diffs = [values[s] - ref[s] for s in sorted(values)]
                n, sd = len(diffs), _sd(diffs)
                mdd = minimum_detectable_difference(sd, n, ALPHA, POWER, paired=True) if n > 1 else math.inf
                rows.append({"benchmark": labels.get(benchmark, benchmark), "method": method, "against": against,
                             "seeds": n, "diff": mean, "t_low": low, "t_high": high, "sd_diff": sd,
                             "detectable": mdd, "verdict": interval_verdict(low, high)})  # fmt: skip
    return rows


def format_rows(
    per_seed: Mapping[str, Mapping[str, Mapping[int, dict]]], sft: Mapping[str, dict], labels: Mapping[str, str]
) -> list[dict]:
    """A row per (benchmark, model): the format fractions averaged over training seeds (the SFT model's own);
    ``letter_answer`` only where the benchmark is multiple choice. Benchmarks whose summaries carry no format
    fractions (an accuracy-only total) are left out."""
    rows = []
    for benchmark, by_method in per_seed.items():
        models = {"sft": [sft[benchmark]]} | {m: list(v.values()) for m, v in by_method.items()}
        for model, summaries in models.items():
            keys = [k for k in (*FORMAT_KEYS, LETTER_KEY) if all(k in s for s in summaries)]
            if keys:
                row = {"benchmark": labels.get(benchmark, benchmark), "model": model}
                rows.append(row | {k: float(np.mean([s[k] for s in summaries])) for k in keys})
    return rows


def ablation_plots(
    per_seed: Mapping[str, Mapping[str, Mapping[int, dict]]], sft: Mapping[str, dict],
    ref_weights: Mapping[str, float], kl_method: str | None, labels: Mapping[str, str], out_dir: str,
) -> list[str]:  # fmt: skip
    """``ablation_<benchmark>.png`` in ``out_dir`` per benchmark: accuracy against ref_weight of the methods in
    ``ref_weights`` (method -> its ref_weight) with their seed t-intervals, the KL-GRPO level with its interval and
    the SFT level. Returns the file names."""
    files = []
    for benchmark, by_method in per_seed.items():
        acc = accuracies(by_method)
        points = {ref_weights[m]: seed_t_interval([v[s] for s in sorted(v)]) for m, v in acc.items()
                  if m in ref_weights}  # fmt: skip
        kl = seed_t_interval([acc[kl_method][s] for s in sorted(acc[kl_method])]) if kl_method in acc else None
        name = f"ablation_{benchmark}.png"
        plot_ablation(points, os.path.join(out_dir, name), kl=kl, sft=float(sft[benchmark]["accuracy"]),
                      ylabel="greedy accuracy (mean over training seeds)",
                      title=f"{labels.get(benchmark, benchmark)}: accuracy against ref_weight")  # fmt: skip
        files.append(name)
    return files


def reproduction_markdown(
    per_seed: Mapping[str, Mapping[str, Mapping[int, dict]]], sft: Mapping[str, dict], *,
    ref_weights: Mapping[str, float], kl_method: str | None, labels: Mapping[str, str], counts: Mapping[str, int],
    plots: Sequence[str], curves: Sequence[str], methods: Sequence[dict], timings: Mapping[str, float],
    config_yaml: str,
) -> str:  # fmt: skip
    """The reproduction job's ``report.md`` (see the module docstring); ``counts`` holds the held-out problems per
    benchmark, ``plots`` the ablation files, ``curves`` the training-curve files."""
    seeds = sorted({s for by_method in per_seed.values() for v in by_method.values() for s in v})
    paired = paired_rows(per_seed, sft, kl_method, labels)
    detectable = [r["detectable"] for r in paired if math.isfinite(r["detectable"])]
    lines = [
        "# Reproduction job: logit-averaging GRPO across training seeds, with the ref_weight ablation\n",
        f"Training seeds {seeds} (each sets the GRPO run's seed and the rollout seeds derived from it; the SFT model "
        "is one model, trained once). Every GRPO run has the same budget, group size and reward (table Methods). "
        "Greedy accuracy on the held-out problems: "
        + ", ".join(f"{labels.get(b, b)} {counts[b]}" for b in per_seed)
        + ". Logit-averaging models are evaluated as deployed: pi_mix of the policy and the SFT reference.\n",
        "## Accuracy across training seeds (mean, 95% t-interval over seeds)\n",
        markdown_table(across_seed_rows(per_seed, sft, labels)),
        "\n## Paired differences across seeds (to SFT and to KL-GRPO)\n",
        "Per-seed differences, matched by training seed; 95% paired t-interval; `detectable`: the smallest true "
        f"difference a two-sided paired t-test at alpha {ALPHA} over these seeds detects with power {POWER} at "
        "the observed spread of the differences"
        + (f" (here {min(detectable):.3f} to {max(detectable):.3f})" if detectable else "")
        + ". A difference smaller than that is not something this design can show or rule out.\n",
        markdown_table(paired),
        "\n## Format compliance (fractions of completions, mean over seeds)\n",
        "`has_boxed`: a final `\\boxed{}`; `boxed_latex_valid`: the grader's LaTeX parser reads it; `letter_answer`"
        " (multiple choice): the reply states an option letter the grader reads; `ended_by_eos`: not truncated.\n",
        markdown_table(format_rows(per_seed, sft, labels)),
        "\n## Accuracy against ref_weight (bars: 95% t-interval over seeds; lines: KL-GRPO, shaded its interval, "
        "and SFT)\n",
        *[f"![{name}]({name})\n" for name in plots],
    ]
    for benchmark, by_method in per_seed.items():
        lines += [f"\n## Per seed: {labels.get(benchmark, benchmark)} accuracy\n", seed_table(accuracies(by_method))]
    lines += run_sections(curves, methods, timings, config_yaml, curves_title="Training curves (every run)",
                          timings_note="GRPO runs side by side: their wall clock is the line that says so",
                          also="; `seeds.json` holds every figure above")  # fmt: skip
    return "\n".join(lines)


__all__ = ["ablation_plots", "accuracies", "across_seed_rows", "format_rows", "paired_rows", "reproduction_markdown"]

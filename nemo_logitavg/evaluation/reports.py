"""Reports and plots of evaluations: the ``results.*`` files of an evaluation (and reading them back), the main
job's report and its training-curve plots, and for the reproduction job the per-seed table and the ref_weight
ablation plot (the tables themselves are ``nemo_logitavg.tables``). Data in, files out: nothing here reads a run
directory; ``job_report`` and the recipes gather the data.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

from nemo_logitavg.evaluation.scoring import Run, aggregate, compare
from nemo_logitavg.evaluation.stats import seed_t_interval
from nemo_logitavg.tables import csv_text, markdown_table


def write_reports(out_dir: str, runs: Sequence[Run], baseline: str | None = None, num_resamples: int = 10_000) -> dict:
    """Write ``results.{md,csv,json}`` (per-seed runs and the across-seed aggregate), ``comparison.{md,csv}``
    when a baseline is named, and ``samples.jsonl`` (every completion with its reward). Returns the JSON."""
    os.makedirs(out_dir, exist_ok=True)
    per_run = [{"model": r.model, "mode": r.mode, "dataset": r.dataset, "seed": r.seed, **r.summary} for r in runs]
    agg = aggregate(runs, num_resamples)
    comparison = compare(runs, baseline, num_resamples) if baseline else []
    payload = {
        "runs": [{**row, "per_problem": run.per_problem()} for row, run in zip(per_run, runs, strict=True)],
        "aggregate": agg,
        "comparison": comparison,
    }
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w", encoding="utf-8") as fh:
        fh.write(csv_text(agg))
    with open(os.path.join(out_dir, "runs.csv"), "w", encoding="utf-8") as fh:
        fh.write(csv_text(per_run))
    md = ["# Evaluation\n", "## Across seeds (mean, std over seeds; 95% bootstrap CI over problems)\n"]
    md.append(markdown_table(agg))
    md += ["\n## Per run\n", markdown_table(per_run)]
    if comparison:
        cmp_md = markdown_table(comparison)
        md += [f"\n## Against {baseline} (paired-bootstrap 95% CI of the accuracy difference)\n", cmp_md]
        with open(os.path.join(out_dir, "comparison.md"), "w", encoding="utf-8") as fh:
            fh.write(cmp_md)
        with open(os.path.join(out_dir, "comparison.csv"), "w", encoding="utf-8") as fh:
            fh.write(csv_text(comparison))
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(md))
    with open(os.path.join(out_dir, "samples.jsonl"), "w", encoding="utf-8") as fh:
        for run in runs:
            for row in run.rows:
                fh.write(json.dumps({"model": run.model, "mode": run.mode, "seed": run.seed, **row}) + "\n")
    return payload


def runs_from_json(path: str) -> list[Run]:
    """Runs of an earlier ``results.json`` (per-problem scores only), to compare evaluations made separately."""
    with open(path, encoding="utf-8") as fh:
        payload = json.load(fh)
    runs = []
    for entry in payload["runs"]:
        summary = {k: v for k, v in entry.items() if k not in ("model", "mode", "dataset", "seed", "per_problem")}
        rows = [{"id": i, "score": s} for i, s in entry["per_problem"].items()]
        runs.append(Run(entry["model"], entry["mode"], entry["dataset"], entry["seed"], summary, rows))
    return runs


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only: the job runs without a display)."""
    # matplotlib is heavy (~0.7 s) and only plots need it; the backend must be chosen before pyplot is imported
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict[str, list[dict]], out: str, start_accuracy: float | None = None) -> list[str]:
    """PNG plots of training reward and held-out greedy accuracy against step, one line per method (``curves``:
    method -> its per-step metrics rows); the accuracy lines start at ``start_accuracy`` (step 0) when given.
    Returns the file names written in ``out``."""
    plt = _pyplot()
    files = []
    for key, title, filename in (
        ("reward/mean", "training reward (mean over the step's samples)", "reward.png"),
        ("eval/accuracy", "held-out greedy accuracy (curve subset; step 0: the SFT model)", "accuracy.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rows in curves.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            if key == "eval/accuracy" and start_accuracy is not None:
                points.insert(0, (0, start_accuracy))
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, filename), dpi=100)
        plt.close(fig)
        files.append(filename)
    return files


def plot_ablation(
    by_ref_weight: Mapping[float, tuple[float, float, float]], out: str,
    kl: tuple[float, float, float] | None = None, sft: float | None = None,
    ylabel: str = "held-out greedy accuracy", title: str = "logit averaging: accuracy against ref_weight",
) -> str:  # fmt: skip
    """A PNG at ``out``: accuracy against ref_weight (``by_ref_weight``: a -> (mean, low, high) over training seeds,
    e.g. ``seed_t_interval``), the intervals as error bars; KL-GRPO's level (mean, low, high) as a horizontal line
    with its interval shaded, and the SFT model's accuracy as a horizontal line. NaN bounds (one seed) draw no
    bar. Returns ``out``."""
    plt = _pyplot()
    weights = sorted(by_ref_weight)
    means = [by_ref_weight[a][0] for a in weights]
    below = [_bar(by_ref_weight[a][0] - by_ref_weight[a][1]) for a in weights]
    above = [_bar(by_ref_weight[a][2] - by_ref_weight[a][0]) for a in weights]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(weights, means, yerr=[below, above], marker="o", capsize=4, label="logit-avg GRPO (pi_mix)")
    if kl is not None:
        line = ax.axhline(kl[0], linestyle="--", color="tab:red", label="KL-GRPO")
        if math.isfinite(kl[1]) and math.isfinite(kl[2]):
            ax.axhspan(kl[1], kl[2], color=line.get_color(), alpha=0.15)
    if sft is not None:
        ax.axhline(sft, linestyle=":", color="tab:gray", label="SFT")
    ax.set_xlabel("ref_weight a")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _bar(length: float) -> float:
    """An error-bar length: none where the interval is undefined (NaN, one seed)."""
    return length if math.isfinite(length) else 0.0


def seed_table(by_method: Mapping[str, Mapping[int, float]], confidence: float = 0.95) -> str:
    """A markdown table with a row per method: its value at each training seed (a column per seed; blank where
    the method lacks that seed), their mean and the t-interval across seeds (``seed_t_interval``)."""
    seeds = sorted({s for values in by_method.values() for s in values})
    rows = []
    for method, values in by_method.items():
        mean, low, high = seed_t_interval([values[s] for s in sorted(values)], confidence)
        row: dict = {"method": method, **{f"seed {s}": values.get(s, "") for s in seeds}}
        rows.append({**row, "n": len(values), "mean": mean, "t_low": low, "t_high": high})
    return markdown_table(rows)


def report_markdown(
    payload: dict, plots: Sequence[str], by_type: Sequence[dict], timings: dict[str, float], *, baseline: str,
    sampled_k: int, seeds: Sequence[int], methods: Sequence[dict], config_yaml: str,
) -> str:  # fmt: skip
    """The main job's ``report.md``: ``payload`` of ``write_reports`` (aggregate and comparison with
    ``baseline``), the plot files, the by-type table, the seconds per phase, one row per GRPO method (its
    settings) and the job config as YAML."""
    agg = payload["aggregate"]
    columns = ["model", "mode", "num_seeds", "num_problems", "k", "accuracy_mean", "accuracy_std", "ci_low",
               "ci_high", "has_boxed", "boxed_latex_valid", "ended_by_eos", "mean_length"]  # fmt: skip
    columns = [c for c in columns if not agg or c in agg[0]]
    cmp_columns = ["model", "mode", "accuracy", "baseline_accuracy", "diff", "diff_ci_low", "diff_ci_high", "verdict"]
    lines = [
        "# Main job: logit-averaging GRPO vs KL-GRPO from one SFT model\n",
        f"Held-out problems: {agg[0]['num_problems'] if agg else 0}; greedy is the headline (once), sampled runs "
        f"k={sampled_k} at temperature 1 for each of the seeds {list(seeds)}. Logit-averaging "
        "models are evaluated as deployed: pi_mix (the bundle of policy, SFT reference and ref_weight).\n",
        "## Accuracy (95% bootstrap CI over problems), format compliance, response length\n",
        markdown_table(agg, columns),
        f"\n## Against {baseline} (paired bootstrap over problems, 95% CI of the accuracy difference)\n",
        markdown_table(payload["comparison"], cmp_columns),
        "\n## Accuracy by problem type (where training changed the model)\n",
        markdown_table(by_type),
        *run_sections(plots, methods, timings, config_yaml),
    ]
    return "\n".join(lines)


def run_sections(
    curves: Sequence[str], methods: Sequence[dict], timings: Mapping[str, float], config_yaml: str, *,
    curves_title: str = "Training curves",
    timings_note: str = "a phase that was interrupted counts the run that completed it", also: str = "",
) -> list[str]:  # fmt: skip
    """The closing sections of a job's report: training-curve plots, the methods' settings, seconds per phase
    and the exact config (``also``: a sentence on further files beside the report)."""
    return [
        f"\n## {curves_title}\n",
        *[f"![{name}]({name})\n" for name in curves],
        "\n## Methods\n",
        markdown_table(methods),
        f"\n## Time per phase (seconds; {timings_note})\n",
        markdown_table([{"phase": k, "seconds": round(v, 1)} for k, v in timings.items()]),
        "\n## Exact config\n",
        # The report's own words (kept from before the job was renamed, so its report.md reads the same).
        "The pipeline config (`config.yaml`) and the config of every phase (`configs/`) are copied beside this "
        f"report{also}.\n\n```yaml\n" + config_yaml + "```\n",
    ]


__all__ = [
    "plot_ablation",
    "plot_curves",
    "report_markdown",
    "run_sections",
    "runs_from_json",
    "seed_table",
    "write_reports",
]

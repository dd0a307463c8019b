"""The report of the main job and of the reproduction job (``nemo_logitavg.job``), gathered from the job's run
directory: the evaluations' ``results.json`` and ``samples.jsonl``, the GRPO runs' ``metrics.jsonl``, the held-out
data and the configs. The figures and the markdown are ``reports`` (main job) and ``reproduction`` (training
seeds); this module reads the files and hands them over.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Protocol

from omegaconf import OmegaConf

from nemo_logitavg.config import GRPOConfig, JobConfig
from nemo_logitavg.data import read_jsonl, read_prompts
from nemo_logitavg.evaluation import reproduction
from nemo_logitavg.evaluation.reports import plot_curves, report_markdown, runs_from_json, write_reports
from nemo_logitavg.evaluation.scoring import Run, accuracy_by_type

# Held-out benchmarks by record source: the generated problems asked for a boxed answer, and as multiple choice.
BENCHMARKS = {"arith": "MATH-style", "arith_mcq": "MMLU-style", "all": "all held-out"}


class PlannedRun(Protocol):
    """One GRPO run of a job: its method and training seed (None: the main job's one run per method)."""

    @property
    def method(self) -> str: ...

    @property
    def seed(self) -> int | None: ...


class PlannedJob(Protocol):
    """What the report reads of a planned job (``nemo_logitavg.job.Plan``): its config, its GRPO runs by name (their
    configs and what they train, seed-major) and where its files are."""

    @property
    def cfg(self) -> JobConfig: ...

    @property
    def methods(self) -> Mapping[str, GRPOConfig]: ...

    @property
    def runs(self) -> Mapping[str, PlannedRun]: ...

    def path(self, *parts: str) -> str: ...


def write_report(p: PlannedJob, timings: Mapping[str, float]) -> None:
    """report/: report.md (tables, plots, config), results.{md,csv,json}, comparison.*, reward/accuracy PNGs.
    ``timings``: seconds per phase so far."""
    out = p.path("report")
    os.makedirs(out, exist_ok=True)
    names = [p.cfg.baseline, *p.methods]
    runs = []
    for name in names:
        runs += runs_from_json(p.path("eval", name, "results.json"))
    payload = write_reports(out, runs, p.cfg.baseline)
    curves = {name: _read_metrics(os.path.join(cfg.run.dir, "metrics.jsonl")) for name, cfg in p.methods.items()}
    plots = plot_curves(curves, out, start_accuracy=_baseline_curve_accuracy(p))
    types = {r["id"]: r["meta"]["type"] for r in read_jsonl(p.path("data", "test.jsonl"))}
    samples = {name: read_jsonl(p.path("eval", name, "samples.jsonl")) for name in names}
    by_type = accuracy_by_type(types, samples)
    with open(os.path.join(out, "accuracy_by_type.json"), "w", encoding="utf-8") as fh:
        json.dump(by_type, fh, indent=1)
    _copy_configs(p, out)
    report = report_markdown(
        payload, plots, by_type, dict(timings), baseline=p.cfg.baseline, sampled_k=p.cfg.eval.sampled_k,
        seeds=p.cfg.eval.seeds, methods=_method_rows(p), config_yaml=OmegaConf.to_yaml(OmegaConf.structured(p.cfg)),
    )  # fmt: skip
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(report)


def write_seed_report(p: PlannedJob, timings: Mapping[str, float]) -> None:
    """report/ of a job with training seeds (the reproduction job): report.md (accuracy across seeds with
    t-intervals, paired differences to SFT and KL-GRPO with the detectable difference, format metrics, the
    ref_weight ablation plots, the per-seed tables), seeds.json (every figure of it), results.* (every evaluated
    model, bootstrap over problems) and the training curves. ``timings``: seconds per phase so far."""
    out = p.path("report")
    os.makedirs(out, exist_ok=True)
    names = [p.cfg.baseline, *p.methods]
    runs = {name: runs_from_json(p.path("eval", name, "results.json")) for name in names}
    write_reports(out, [run for group in runs.values() for run in group], p.cfg.baseline)
    greedy = {name: _greedy_by_benchmark(group) for name, group in runs.items()}
    sft = greedy[p.cfg.baseline]
    per_seed: dict[str, dict[str, dict[int, dict]]] = {benchmark: {} for benchmark in sft}
    for name, trained in p.runs.items():
        for benchmark, summary in greedy[name].items():
            per_seed[benchmark].setdefault(trained.method, {})[trained.seed] = summary
    first: dict[str, GRPOConfig] = {}  # a method's config (its first seed's; the seeds differ in run.seed only)
    for name, trained in p.runs.items():
        first.setdefault(trained.method, p.methods[name])
    # The ablation's points are the pi_mix runs; the KL-GRPO level is the policy-alone run with a KL term.
    ref_weights = {m: c.algorithm.ref_weight for m, c in first.items() if c.algorithm.ref_weight > 0}
    kl = next((m for m, c in first.items() if c.algorithm.ref_weight == 0 and c.algorithm.beta > 0), None)
    plots = reproduction.ablation_plots(per_seed, sft, ref_weights, kl, BENCHMARKS, out)
    curves = {name: _read_metrics(os.path.join(cfg.run.dir, "metrics.jsonl")) for name, cfg in p.methods.items()}
    curve_plots = plot_curves(curves, out, start_accuracy=_baseline_curve_accuracy(p))
    records = read_prompts(p.path("data", "test.jsonl"))
    counts = {b: sum(r["source"] == b for r in records) for b in per_seed} | {"all": len(records)}
    seeds_by_method = {m: sorted(v) for m, v in next(iter(per_seed.values())).items()}
    methods = [row | {"seeds": seeds_by_method[row["method"]]} for row in _method_rows(p, first)]
    _copy_configs(p, out)
    report = reproduction.reproduction_markdown(
        per_seed, sft, ref_weights=ref_weights, kl_method=kl, labels=BENCHMARKS, counts=counts, plots=plots,
        curves=curve_plots, methods=methods, timings=dict(timings),
        config_yaml=OmegaConf.to_yaml(OmegaConf.structured(p.cfg)),
    )  # fmt: skip
    figures = {
        "per_seed": per_seed, "sft": sft, "ref_weights": ref_weights, "kl_method": kl,
        "across_seeds": reproduction.across_seed_rows(per_seed, sft, BENCHMARKS),
        "paired": reproduction.paired_rows(per_seed, sft, kl, BENCHMARKS),
        "format": reproduction.format_rows(per_seed, sft, BENCHMARKS),
    }  # fmt: skip
    with open(os.path.join(out, "seeds.json"), "w", encoding="utf-8") as fh:
        json.dump(figures, fh, indent=1)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(report)


def _copy_configs(p: PlannedJob, out: str) -> None:
    """The job config, the seconds per phase and every phase's config, beside the report."""
    for name in ("config.yaml", "timings.json"):
        shutil.copy(p.path(name), os.path.join(out, name))
    shutil.copytree(p.path("configs"), os.path.join(out, "configs"), dirs_exist_ok=True)


def _greedy_by_benchmark(runs: list[Run]) -> dict[str, dict]:
    """Benchmark (record source) -> the greedy run's summary; with several benchmarks also ``all``: the accuracy
    over every held-out problem (the benchmarks' accuracies weighted by their problem counts)."""
    out = {run.dataset: run.summary for run in runs if run.mode == "greedy"}
    if len(out) > 1:
        total = sum(s["num_problems"] for s in out.values())
        accuracy = sum(s["accuracy"] * s["num_problems"] for s in out.values()) / total
        out["all"] = {"accuracy": accuracy, "num_problems": total}
    return out


def _method_rows(p: PlannedJob, methods: Mapping[str, GRPOConfig] | None = None) -> list[dict]:
    """The report's table of GRPO methods (``methods``, default every run): the settings that tell them apart."""
    return [
        {
            "method": name,
            "ref_weight": c.algorithm.ref_weight,
            "beta": c.algorithm.beta,
            "steps": c.run.steps,
            "prompts_per_step": c.rollout.prompts_per_step,
            "group_size": c.algorithm.group_size,
            "lr": c.optim.lr,
        }
        for name, c in (p.methods if methods is None else methods).items()
    ]


def _read_metrics(path: str) -> list[dict]:
    """Per-step metrics of a GRPO run; a resumed run's repeated steps keep their last line."""
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def _baseline_curve_accuracy(p: PlannedJob) -> float | None:
    """The baseline's greedy accuracy on the curve subset, from its evaluation: step 0 of every method's accuracy
    curve (before any update, each method serves the SFT model: pi_mix of two equal models, or the policy)."""
    curve = {r["id"] for r in read_jsonl(p.path("data", "curve.jsonl"))}
    scores = [
        s["score"]
        for s in read_jsonl(p.path("eval", p.cfg.baseline, "samples.jsonl"))
        if s["mode"] == "greedy" and s["id"] in curve
    ]
    return sum(scores) / len(scores) if scores else None


__all__ = ["BENCHMARKS", "PlannedJob", "PlannedRun", "write_report", "write_seed_report"]

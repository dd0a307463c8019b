r"""Evaluation: sample completions of test prompts through a rollout server, score them, and report accuracy with
bootstrap confidence intervals, format metrics and response length; compare runs with a paired bootstrap.

Models. ``resolve_model`` accepts

- a Hugging Face directory (``config.json``): served alone (the server gets it as policy and reference with
  ``ref_weight = 0``, so pi_mix is the model itself);
- a Megatron checkpoint written by ``recipes/convert_hf_to_mcore.py`` (``meta.json`` + ``mp_rank_*``): converted to
  a Hugging Face directory in a work directory first;
- an averaged-model bundle (DESIGN.md §7): ``config.json`` ``{"architectures": ["LogitAveragedForCausalLM"],
  "ref_weight": a}``, ``policy/`` and ``reference/`` (or ``"reference_path"`` in config.json). The headline model
  is pi_mix; ``policy_alone=True`` serves its policy half alone.

Metrics (per model, sampling mode, dataset and seed). Each problem gets ``k`` completions; its score is the mean
reward over them (pass@1 estimated from k samples) and accuracy is the mean over problems. The 95% interval is a
percentile bootstrap over problems (problems resampled with replacement, seeded). Format metrics are fractions of
completions: ``has_boxed``, ``boxed_latex_valid``, ``ended_by_eos``; ``mean_length`` is in tokens. Across seeds,
``aggregate`` reports the mean and the sample standard deviation (ddof 1) of each seed's accuracy, and the
bootstrap interval of the per-problem scores averaged over seeds. Greedy decoding (temperature 0, the headline of
DESIGN.md §7) is deterministic, so a greedy mode runs once whatever the seeds.

Comparison. ``compare`` pairs each run with a baseline run on the same problems: the difference of accuracies
and the paired-bootstrap 95% interval of that difference (the same resampled problems for both). "Above the
baseline beyond the CI" means that interval lies above 0 (``verdict == "above"``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from nemo_logitavg.data.prompts import encode_prompt
from nemo_logitavg.rewards import format_metrics_batch, score_math, score_mcq

logger = logging.getLogger(__name__)

BUNDLE_ARCHITECTURE = "LogitAveragedForCausalLM"
FORMAT_KEYS = ("has_boxed", "boxed_latex_valid", "ended_by_eos")

# --------------------------------------------------------------------------------------------------- bundles


@dataclass
class Bundle:
    path: str
    policy: str
    reference: str
    ref_weight: float
    config: dict


def _check_ref_weight(ref_weight: float) -> float:
    ref_weight = float(ref_weight)
    if not 0.0 <= ref_weight <= 1.0:
        raise ValueError(f"ref_weight must lie in [0, 1], got {ref_weight}")
    return ref_weight


def write_bundle(
    policy_dir: str | os.PathLike, reference_dir: str | os.PathLike, ref_weight: float, out: str | os.PathLike,
    copy_reference: bool = True,
) -> str:  # fmt: skip
    """Write an averaged-model bundle: ``out/config.json``, ``out/policy/`` (a copy of ``policy_dir``) and
    ``out/reference/`` (a copy), or, with ``copy_reference=False``, the reference's absolute path in config.json
    under ``reference_path``. Returns ``out``."""
    ref_weight = _check_ref_weight(ref_weight)
    policy_dir, reference_dir, out = os.fspath(policy_dir), os.fspath(reference_dir), os.fspath(out)
    for name, path in (("policy", policy_dir), ("reference", reference_dir)):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{name} {path} is not a Hugging Face directory (no config.json)")
    os.makedirs(out, exist_ok=True)
    shutil.copytree(policy_dir, os.path.join(out, "policy"), dirs_exist_ok=True)
    config = {"architectures": [BUNDLE_ARCHITECTURE], "ref_weight": ref_weight}
    if copy_reference:
        shutil.copytree(reference_dir, os.path.join(out, "reference"), dirs_exist_ok=True)
    else:
        config["reference_path"] = os.path.abspath(reference_dir)
    with open(os.path.join(out, "policy", "config.json"), encoding="utf-8") as fh:
        policy_config = json.load(fh)
    if "vocab_size" in policy_config:
        config["vocab_size"] = policy_config["vocab_size"]
    # transformers loads the bundle as pi_mix with trust_remote_code: the modeling file travels with it.
    from nemo_logitavg.release import modeling_logit_averaged

    shutil.copy(modeling_logit_averaged.__file__, os.path.join(out, "modeling_logit_averaged.py"))
    config["model_type"] = "logit_averaged"
    config["auto_map"] = {
        "AutoConfig": "modeling_logit_averaged.LogitAveragedConfig",
        "AutoModelForCausalLM": "modeling_logit_averaged.LogitAveragedForCausalLM",
    }
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    return out


def is_bundle(path: str | os.PathLike) -> bool:
    config = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError:
            return False
    return isinstance(data, dict) and BUNDLE_ARCHITECTURE in (data.get("architectures") or [])


def read_bundle(path: str | os.PathLike) -> Bundle:
    """The bundle at ``path`` (ValueError naming what is missing or wrong)."""
    path = os.fspath(path)
    if not is_bundle(path):
        raise ValueError(f"{path} is not a bundle (config.json without architectures [{BUNDLE_ARCHITECTURE!r}])")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    if not isinstance(config.get("ref_weight"), (int, float)) or isinstance(config.get("ref_weight"), bool):
        raise ValueError(f"{path}/config.json: ref_weight must be a number")
    ref_weight = _check_ref_weight(config["ref_weight"])
    policy = os.path.join(path, "policy")
    reference = config.get("reference_path") or os.path.join(path, "reference")
    if not os.path.isabs(reference):
        reference = os.path.join(path, reference)
    for name, sub in (("policy", policy), ("reference", reference)):
        if not os.path.isfile(os.path.join(sub, "config.json")):
            raise ValueError(f"{path}: bundle {name} {sub} is not a Hugging Face directory")
    return Bundle(path=path, policy=policy, reference=reference, ref_weight=ref_weight, config=config)


def is_mcore_checkpoint(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "meta.json")) and any(
        name.startswith("mp_rank_") for name in os.listdir(path)
    )


@dataclass
class ServedModel:
    """What a rollout server is started with to serve a model."""

    policy: str
    reference: str | None  # None: the policy alone (ref_weight 0), one model loaded
    ref_weight: float
    kind: str  # "hf", "mcore" or "bundle"


def resolve_model(path: str | os.PathLike, workdir: str, policy_alone: bool = False) -> ServedModel:
    """How to serve ``path`` (see the module docstring); a Megatron checkpoint is converted into ``workdir``."""
    path = os.fspath(path)
    if is_bundle(path):
        bundle = read_bundle(path)
        if policy_alone:
            return ServedModel(bundle.policy, None, 0.0, "bundle")
        return ServedModel(bundle.policy, bundle.reference, bundle.ref_weight, "bundle")
    if is_mcore_checkpoint(path):
        from nemo_logitavg.models.hf_conversion import convert_mcore_to_hf

        hf_dir = tempfile.mkdtemp(prefix="hf_", dir=workdir)
        convert_mcore_to_hf(path, hf_dir)
        return ServedModel(hf_dir, None, 0.0, "mcore")
    if os.path.isfile(os.path.join(path, "config.json")):
        return ServedModel(path, None, 0.0, "hf")
    raise ValueError(f"{path}: neither a Hugging Face directory, a Megatron converter checkpoint nor a bundle")


# --------------------------------------------------------------------------------------------------- bootstrap


def bootstrap_means(
    values: Sequence[float] | np.ndarray, num_resamples: int = 10_000, seed: int = 0, max_elements: int = 1 << 22
) -> np.ndarray:
    """Means of ``num_resamples`` resamples (with replacement, same size) of ``values`` (1-D, or 2-D ``[n, d]``
    resampled on rows, giving ``[num_resamples, d]``). Vectorised in chunks of at most ``max_elements`` indices."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n == 0:
        raise ValueError("cannot bootstrap zero values")
    rng = np.random.default_rng(seed)
    out = np.empty((num_resamples, *values.shape[1:]), dtype=np.float64)
    chunk = max(1, max_elements // n)
    for start in range(0, num_resamples, chunk):
        stop = min(num_resamples, start + chunk)
        index = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[index].mean(axis=1)
    return out


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, confidence: float = 0.95, num_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (e.g. per-problem scores)."""
    means = bootstrap_means(values, num_resamples, seed)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_bootstrap(
    values: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray, confidence: float = 0.95,
    num_resamples: int = 10_000, seed: int = 0,
) -> tuple[float, float, float]:  # fmt: skip
    """``(mean difference, low, high)``: the percentile bootstrap interval of ``mean(values - baseline)`` with the
    same problems resampled for both (the arrays are aligned by problem)."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs aligned arrays, got shapes {a.shape} and {b.shape}")
    low, high = bootstrap_ci(a - b, confidence, num_resamples, seed)
    return float((a - b).mean()), low, high


# --------------------------------------------------------------------------------------------------- sampling


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


def score_records(
    records: Sequence[dict], completions: Sequence[Sequence], math_timeout: float = 5.0
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
    rewards = [0.0] * len(flat_text)
    for kind, scorer in (("math", lambda t, g: score_math(t, g, timeout=math_timeout)), ("mcq", score_mcq)):
        index = [i for i, k in enumerate(flat_kind) if k == kind]
        if index:
            scores = scorer([flat_text[i] for i in index], [flat_gold[i] for i in index])
            for i, s in zip(index, scores, strict=True):
                rewards[i] = float(s)
    unknown = sorted(set(flat_kind) - {"math", "mcq"})
    if unknown:
        raise ValueError(f"unknown reward kinds {unknown}")
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
    summary["mean_length"] = float(np.mean([v for r in rows for v in r["lengths"]]))
    return summary


def generate(
    client, tokenizer, records: Sequence[dict], mode: SamplingMode, max_tokens: int, seed: int, batch: int = 256
) -> list[list]:
    """Completions of every record's prompt (k each) through a ``RolloutClient``, in record order, ``batch``
    prompts a request (the torch engine decodes a request's sequences together: fewer, wider steps)."""
    out: list[list] = []
    for start in range(0, len(records), batch):
        part = records[start : start + batch]
        ids = [encode_prompt(r["prompt"], tokenizer) for r in part]
        out += client.generate(
            ids, n=mode.k, max_tokens=max_tokens, temperature=mode.temperature, top_p=mode.top_p,
            seed=seed * 1_000_003 + start,
        )  # fmt: skip
        logger.info("generated %d/%d (%s, seed %d)", len(out), len(records), mode.name, seed)
    return out


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


def evaluate_served(
    client, tokenizer, name: str, records: Sequence[dict], modes: Sequence[SamplingMode], seeds: Sequence[int],
    max_tokens: int, math_timeout: float = 5.0, num_resamples: int = 10_000,
) -> list[Run]:  # fmt: skip
    """Runs of one served model over ``records`` for every mode and seed (greedy modes once, with the first
    seed), one Run per dataset (record ``source``)."""
    runs = []
    for mode in modes:
        for seed in seeds[:1] if mode.greedy else seeds:
            completions = generate(client, tokenizer, records, mode, max_tokens, seed)
            rows = score_records(records, completions, math_timeout)
            for dataset in sorted({r["source"] for r in records}):
                part = [row for row in rows if row["source"] == dataset]
                runs.append(Run(name, mode.name, dataset, seed, summarize(part, num_resamples, seed), part))
    return runs


def evaluate_model(
    path: str, name: str, records: Sequence[dict], modes: Sequence[SamplingMode], seeds: Sequence[int],
    max_tokens: int, workdir: str, policy_alone: bool = False, math_timeout: float = 5.0,
    num_resamples: int = 10_000, server_args: Sequence[str] = (), ready_timeout: float = 600.0,
) -> list[Run]:  # fmt: skip
    """Serve the model at ``path`` (see ``resolve_model``) with a rollout server on 127.0.0.1 (a child process,
    stopped at the end; its log is ``workdir/<name>.server.log``; a random bearer token) and evaluate it."""
    from transformers import AutoTokenizer

    from nemo_logitavg.rollout.client import RolloutClient
    from nemo_logitavg.rollout.process import ServerProcess

    os.makedirs(workdir, exist_ok=True)
    served = resolve_model(path, workdir, policy_alone=policy_alone)
    tokenizer = AutoTokenizer.from_pretrained(served.policy)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    log = os.path.join(workdir, f"{safe}.server.log")
    server = ServerProcess(served.policy, served.reference, served.ref_weight, log, extra_args=list(server_args))
    try:
        server.wait_ready(ready_timeout)
        with RolloutClient(server.url, token=server.token, timeout=3600.0) as client:
            client.check(served.ref_weight)
            return evaluate_served(
                client, tokenizer, name, records, modes, seeds, max_tokens, math_timeout, num_resamples
            )
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------------- reports


def aggregate(runs: Sequence[Run], num_resamples: int = 10_000) -> list[dict]:
    """One row per (model, mode, dataset): mean and std (ddof 1; 0 for one seed) of the seeds' accuracies, the
    bootstrap interval of the seed-averaged per-problem scores, mean format fractions and length."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.model, run.mode, run.dataset), []).append(run)
    rows = []
    for (model, mode, dataset), group in groups.items():
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
    ``below`` when the interval excludes 0, else ``within CI``."""
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
            verdict = "above" if low > 0 else "below" if high < 0 else "within CI"
            rows.append(
                {
                    "model": model, "mode": mode, "dataset": dataset, "baseline": baseline,
                    "num_problems": len(common), "accuracy": float(a.mean()) if common else math.nan,
                    "baseline_accuracy": float(b.mean()) if common else math.nan,
                    "diff": diff, "diff_ci_low": low, "diff_ci_high": high,
                    "verdict": "baseline" if model == baseline else verdict,
                }
            )  # fmt: skip
    return rows


def _group(runs: Sequence[Run]) -> dict[tuple[str, str, str], list[Run]]:
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.model, run.mode, run.dataset), []).append(run)
    return groups


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


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


__all__ = [
    "BUNDLE_ARCHITECTURE",
    "GREEDY",
    "SAMPLED",
    "Bundle",
    "Run",
    "SamplingMode",
    "ServedModel",
    "aggregate",
    "bootstrap_ci",
    "bootstrap_means",
    "compare",
    "evaluate_model",
    "evaluate_served",
    "is_bundle",
    "is_mcore_checkpoint",
    "markdown_table",
    "paired_bootstrap",
    "read_bundle",
    "resolve_model",
    "runs_from_json",
    "score_records",
    "summarize",
    "write_bundle",
    "write_reports",
]

"""Evaluation: the across-seed aggregate and comparison, reports, how models are served, and an end-to-end run of
recipes/evaluate.py on tiny models behind real rollout servers. The interval statistics are tested alone in
test_evaluation_stats.py, the bundle in test_release.py."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nemo_logitavg import evaluation
from nemo_logitavg.data import write_prompts
from nemo_logitavg.models.bundle import read_bundle, write_bundle
from tests.tiny_models import make_fake_hf_dir, make_llama_with_tokenizer

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------- reports


def _run(model, seed, scores, mode="sampled", dataset="math"):
    rows = [
        {"id": f"p{i}", "score": s, "rewards": [s], "lengths": [10], "has_boxed": [True],
         "boxed_latex_valid": [True], "ended_by_eos": [True]}
        for i, s in enumerate(scores)
    ]  # fmt: skip
    return evaluation.Run(model, mode, dataset, seed, evaluation.summarize(rows, 2000, seed), rows)


def test_aggregate_and_compare_across_seeds(tmp_path):
    base = [1.0] * 50 + [0.0] * 150
    runs = [
        _run("sft", 0, base),
        _run("sft", 1, base),
        _run("la", 0, [1.0] * 80 + [0.0] * 120),  # +30 problems solved, none lost
        _run("la", 1, [1.0] * 70 + [0.0] * 130),
    ]
    agg = {row["model"]: row for row in evaluation.aggregate(runs, 2000)}
    assert agg["la"]["accuracy_mean"] == pytest.approx(0.375)
    assert agg["la"]["accuracy_std"] == pytest.approx(np.std([0.4, 0.35], ddof=1))
    assert agg["sft"]["accuracy_std"] == 0.0 and agg["sft"]["num_seeds"] == 2
    cmp = {row["model"]: row for row in evaluation.compare(runs, "sft", 2000)}
    assert cmp["la"]["diff"] == pytest.approx(0.125) and cmp["la"]["verdict"] == "above"
    assert cmp["sft"]["verdict"] == "baseline"

    payload = evaluation.write_reports(str(tmp_path), runs, baseline="sft", num_resamples=2000)
    for name in ("results.md", "results.csv", "results.json", "comparison.md", "comparison.csv", "runs.csv"):
        assert (tmp_path / name).is_file(), name
    assert "| la | sampled | math |" in (tmp_path / "results.md").read_text()
    again = evaluation.runs_from_json(str(tmp_path / "results.json"))
    assert [r.per_problem() for r in again] == [r.per_problem() for r in runs]
    assert evaluation.compare(again, "sft", 2000) == payload["comparison"]


def test_plot_ablation_writes_a_png(tmp_path):
    by_ref_weight = {0.25: (0.60, 0.55, 0.65), 0.5: (0.64, 0.60, 0.68), 0.75: (0.62, math.nan, math.nan)}
    out = evaluation.plot_ablation(by_ref_weight, str(tmp_path / "ablation.png"), kl=(0.58, 0.55, 0.61), sft=0.55)
    data = Path(out).read_bytes()
    assert out == str(tmp_path / "ablation.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert evaluation.plot_ablation({0.5: (0.6, 0.5, 0.7)}, str(tmp_path / "bare.png"))  # no reference lines


def test_seed_table_lists_each_seed_and_the_t_interval():
    table = evaluation.seed_table({"logit_avg": {1: 0.6, 0: 0.5}, "kl": {0: 0.4, 1: 0.4, 2: 0.4}})
    lines = table.splitlines()
    assert lines[0] == "| method | seed 0 | seed 1 | seed 2 | n | mean | t_low | t_high |"
    half = math.tan(0.475 * math.pi) * 0.05  # two seeds: t_{0.975, 1} s / sqrt(2)
    assert lines[2] == f"| logit_avg | 0.5000 | 0.6000 |  | 2 | 0.5500 | {0.55 - half:.4f} | {0.55 + half:.4f} |"
    assert lines[3] == "| kl | 0.4000 | 0.4000 | 0.4000 | 3 | 0.4000 | 0.4000 | 0.4000 |"


# --------------------------------------------------------------------------------------------------- models


def test_resolve_model_serves_a_bundle_as_pi_mix_or_its_policy_alone_and_a_plain_directory_alone(tmp_path):
    policy, reference = make_fake_hf_dir(tmp_path / "pol", "p"), make_fake_hf_dir(tmp_path / "ref", "r")
    out = write_bundle(policy, reference, 0.25, tmp_path / "bundle")
    bundle = read_bundle(out)
    served = evaluation.resolve_model(out, str(tmp_path))
    assert (served.kind, served.ref_weight, served.reference) == ("bundle", 0.25, bundle.reference)
    alone = evaluation.resolve_model(out, str(tmp_path), policy_alone=True)
    assert (alone.ref_weight, alone.reference, alone.policy) == (0.0, None, bundle.policy)  # one model served
    plain = evaluation.resolve_model(policy, str(tmp_path))
    assert (plain.kind, plain.policy, plain.reference, plain.ref_weight) == ("hf", policy, None, 0.0)


def test_resolve_model_refuses_what_it_cannot_serve(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        evaluation.resolve_model(tmp_path, str(tmp_path))


# --------------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_evaluate_recipe_end_to_end(tmp_path):
    policy = make_llama_with_tokenizer(str(tmp_path / "policy"), seed=1)
    reference = make_llama_with_tokenizer(str(tmp_path / "reference"), seed=2)
    bundle = write_bundle(policy, reference, 0.5, tmp_path / "bundle")
    records = [
        {"id": "m1", "source": "math", "prompt": "1+1=?", "answer": "2", "reward": "math"},
        {"id": "m2", "source": "math", "prompt": "2*3=?", "answer": "6", "reward": "math"},
        {"id": "m3", "source": "math", "prompt": "9-4=?", "answer": "5", "reward": "math"},
        {"id": "q1", "source": "mmlu", "prompt": "pick: a. 1 b. 2", "answer": "B", "reward": "mcq"},
    ]
    data = tmp_path / "test.jsonl"
    write_prompts(records, data)
    out = tmp_path / "results"
    cmd = [
        sys.executable, str(REPO / "recipes" / "evaluate.py"), "--data", str(data), "--out", str(out),
        "--model", f"sft={policy}", "--model", f"la0.5={bundle}", "--baseline", "sft", "--seeds", "0,1",
        "--sampled-k", "2", "--max-tokens", "8", "--resamples", "500", "--server-arg=--threads=1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    payload = json.loads((out / "results.json").read_text())
    keys = {(r["model"], r["mode"], r["dataset"], r["seed"]) for r in payload["runs"]}
    # Greedy runs once; sampled once per seed; math and mmlu reported apart.
    assert len(keys) == len(payload["runs"]) == 2 * 2 * (1 + 2)
    for run in payload["runs"]:
        assert 0.0 <= run["ci_low"] <= run["accuracy"] <= run["ci_high"] <= 1.0
        assert run["k"] == (1 if run["mode"] == "greedy" else 2)
        assert 0 < run["mean_length"] <= 8
        assert run["num_problems"] == (3 if run["dataset"] == "math" else 1)
    agg = {(r["model"], r["mode"], r["dataset"]): r for r in payload["aggregate"]}
    assert agg[("la0.5", "sampled", "math")]["num_seeds"] == 2
    assert agg[("sft", "greedy", "math")]["num_seeds"] == 1
    assert {r["verdict"] for r in payload["comparison"] if r["model"] == "sft"} == {"baseline"}
    with open(out / "results.csv", encoding="utf-8") as fh:
        assert len(list(csv.DictReader(fh))) == len(agg)
    assert "la0.5" in (out / "comparison.md").read_text()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(len(s["completions"]) == len(s["rewards"]) for s in samples)
    # The servers were stopped and their logs kept.
    assert (out / "work" / "sft.server.log").is_file() and (out / "work" / "la0.5.server.log").is_file()

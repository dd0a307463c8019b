"""Evaluation: bootstrap intervals against closed forms and scipy, the paired bootstrap, bundles, reports, and an
end-to-end run of recipes/evaluate.py on tiny models behind real rollout servers."""

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
from tests.tiny_models import make_llama_with_tokenizer

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_matches_normal_closed_form_for_bernoulli_mean():
    n, p = 4000, 0.3
    values = np.zeros(n)
    values[: int(p * n)] = 1.0
    low, high = evaluation.bootstrap_ci(values, num_resamples=20_000, seed=1)
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert low == pytest.approx(p - half, abs=0.0015)
    assert high == pytest.approx(p + half, abs=0.0015)


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, size=300) / 4.0  # mean pass@1 over k = 4 samples
    low, high = evaluation.bootstrap_ci(values, num_resamples=20_000, seed=3)
    ref = scipy_stats.bootstrap(
        (values,), np.mean, confidence_level=0.95, n_resamples=20_000, method="percentile", random_state=4
    ).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.005)
    assert high == pytest.approx(ref.high, abs=0.005)


def test_bootstrap_is_seeded_and_chunking_does_not_change_it():
    values = np.random.default_rng(0).random(50)
    a = evaluation.bootstrap_means(values, 1000, seed=7)
    b = evaluation.bootstrap_means(values, 1000, seed=7, max_elements=50 * 3)  # chunks of 3 resamples
    # Same generator stream drawn in different chunk shapes gives the same indices row by row.
    np.testing.assert_allclose(a, b)
    assert not np.allclose(a, evaluation.bootstrap_means(values, 1000, seed=8))


def test_paired_bootstrap_sees_a_small_consistent_gain_that_unpaired_intervals_miss():
    rng = np.random.default_rng(0)
    n = 400
    baseline = (rng.random(n) < 0.5).astype(float)
    better = baseline.copy()
    flip = np.flatnonzero(baseline == 0)[:24]  # 24 more problems solved, none lost: +6 points
    better[flip] = 1.0
    diff, low, high = evaluation.paired_bootstrap(better, baseline, num_resamples=20_000, seed=0)
    assert diff == pytest.approx(24 / n)
    # The paired difference is a Bernoulli(0.06) mean: closed form 0.06 +- 1.96 sqrt(0.06 * 0.94 / 400).
    half = 1.96 * math.sqrt(0.06 * 0.94 / n)
    assert low == pytest.approx(0.06 - half, abs=0.006) and high == pytest.approx(0.06 + half, abs=0.006)
    assert low > 0
    # Unpaired, the two accuracy intervals overlap: only the paired interval separates them.
    assert evaluation.bootstrap_ci(better)[0] < evaluation.bootstrap_ci(baseline)[1]
    # Identical runs: a zero-width interval at 0; a run that loses problems: below.
    assert evaluation.paired_bootstrap(baseline, baseline) == (0.0, 0.0, 0.0)
    assert evaluation.paired_bootstrap(baseline, better)[2] < 0


def test_paired_bootstrap_refuses_misaligned_arrays():
    with pytest.raises(ValueError, match="aligned"):
        evaluation.paired_bootstrap([1.0, 0.0], [1.0])


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


# --------------------------------------------------------------------------------------------------- bundles


def _fake_hf(path: Path, tag: str) -> str:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 100, "tag": tag}))
    (path / "model.safetensors").write_bytes(b"weights " + tag.encode())
    return str(path)


def test_bundle_round_trip(tmp_path):
    policy, reference = _fake_hf(tmp_path / "pol", "p"), _fake_hf(tmp_path / "ref", "r")
    out = evaluation.write_bundle(policy, reference, 0.25, tmp_path / "bundle")
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["architectures"] == ["LogitAveragedForCausalLM"] and config["ref_weight"] == 0.25
    bundle = evaluation.read_bundle(out)
    assert bundle.ref_weight == 0.25
    assert Path(bundle.policy, "model.safetensors").read_bytes() == b"weights p"
    assert Path(bundle.reference, "model.safetensors").read_bytes() == b"weights r"
    served = evaluation.resolve_model(out, str(tmp_path))
    assert (served.kind, served.ref_weight, served.reference) == ("bundle", 0.25, bundle.reference)
    alone = evaluation.resolve_model(out, str(tmp_path), policy_alone=True)
    assert (alone.ref_weight, alone.reference, alone.policy) == (0.0, None, bundle.policy)  # one model served

    linked = evaluation.read_bundle(evaluation.write_bundle(policy, reference, 1.0, tmp_path / "b2", False))
    assert linked.reference == os.path.abspath(reference) and not (tmp_path / "b2" / "reference").exists()
    plain = evaluation.resolve_model(policy, str(tmp_path))
    assert (plain.kind, plain.policy, plain.reference, plain.ref_weight) == ("hf", policy, None, 0.0)


def test_bundle_errors(tmp_path):
    policy = _fake_hf(tmp_path / "pol", "p")
    with pytest.raises(ValueError, match="ref_weight must lie"):
        evaluation.write_bundle(policy, policy, 1.5, tmp_path / "b")
    with pytest.raises(ValueError, match="not a bundle"):
        evaluation.read_bundle(policy)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["LogitAveragedForCausalLM"], "ref_weight": 0.5}))
    with pytest.raises(ValueError, match="policy"):
        evaluation.read_bundle(bad)
    with pytest.raises(ValueError, match="neither"):
        evaluation.resolve_model(tmp_path, str(tmp_path))


# --------------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_evaluate_recipe_end_to_end(tmp_path):
    policy = make_llama_with_tokenizer(str(tmp_path / "policy"), seed=1)
    reference = make_llama_with_tokenizer(str(tmp_path / "reference"), seed=2)
    bundle = evaluation.write_bundle(policy, reference, 0.5, tmp_path / "bundle")
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

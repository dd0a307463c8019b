"""The release's model card: written by recipes/convert_mcore_to_hf.py into the policy directory and the bundle,
from the training config (never its token) and the evaluation table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from nemo_logitavg.config import GRPOConfig, config_as_dict
from nemo_logitavg.models.conversion.mcore_checkpoint import convert_hf_to_mcore
from tests.tiny_models import make_llama_with_tokenizer

ROOT = Path(__file__).resolve().parent.parent

RESULTS = {
    "runs": [],
    "aggregate": [
        {"model": "sft", "mode": "greedy", "dataset": "math", "num_seeds": 1, "num_problems": 500, "k": 1,
         "accuracy_mean": 0.412, "accuracy_std": 0.0, "ci_low": 0.369, "ci_high": 0.455, "has_boxed": 0.97,
         "boxed_latex_valid": 0.95, "ended_by_eos": 0.99, "mean_length": 612.5},
        {"model": "la0.25", "mode": "greedy", "dataset": "math", "num_seeds": 1, "num_problems": 500, "k": 1,
         "accuracy_mean": 0.468, "accuracy_std": 0.0, "ci_low": 0.424, "ci_high": 0.512, "has_boxed": 0.99,
         "boxed_latex_valid": 0.98, "ended_by_eos": 1.0, "mean_length": 540.0},
    ],
    "comparison": [
        {"model": "la0.25", "mode": "greedy", "dataset": "math", "baseline": "sft", "num_problems": 500,
         "accuracy": 0.468, "baseline_accuracy": 0.412, "diff": 0.056, "diff_ci_low": 0.021, "diff_ci_high": 0.09,
         "verdict": "above"},
    ],
}  # fmt: skip


def _convert_recipe():
    spec = importlib.util.spec_from_file_location("convert_mcore_to_hf", ROOT / "recipes" / "convert_mcore_to_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_release_writes_cards_into_the_policy_and_the_bundle(tmp_path):
    sft = make_llama_with_tokenizer(str(tmp_path / "sft"), seed=1)
    convert_hf_to_mcore(sft, tmp_path / "ckpt")  # stands in for the trained policy's checkpoint
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    config = ROOT / "configs" / "grpo_logitavg_8b.yaml"
    overrides = [f"model.policy={sft}", "algorithm.ref_weight=0.25", "rollout.token=hunter2"]
    args = ["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "policy"), "--config", str(config), *overrides]
    _convert_recipe().main([*args, "--results", str(results), "--bundle", str(tmp_path / "la0.25")])

    bundle_card = (tmp_path / "la0.25" / "README.md").read_text()
    assert bundle_card.startswith("---\nlibrary_name: transformers\n")
    assert "pi_mix with reference weight a = 0.25" in bundle_card and "trust_remote_code=True" in bundle_card
    # the training config: key settings, the override applied, the whole YAML, never the token
    assert "| method | logit-averaging GRPO, ref_weight a = 0.25 |" in bundle_card
    assert "| group size | 8 |" in bundle_card and "| nodes | 1 training + 1 rollout |" in bundle_card
    assert "rollout_max_seqs: 96" in bundle_card and "hunter2" not in bundle_card and "<redacted>" in bundle_card
    # the evaluation table and the comparison with its verdict
    assert "| la0.25 | greedy | math | 1 | 500 | 0.4680 | 0.0000 | 0.4240 | 0.5120 |" in bundle_card
    assert "| la0.25 | greedy | math | sft | 0.4680 | 0.4120 | 0.0560 | 0.0210 | 0.0900 | above |" in bundle_card
    assert json.loads((tmp_path / "la0.25" / "config.json").read_text())["ref_weight"] == 0.25

    policy_card = (tmp_path / "policy" / "README.md").read_text()
    assert "LlamaForCausalLM" in policy_card and "policy half of pi_mix (a = 0.25)" in policy_card
    assert "trust_remote_code" not in policy_card and "| la0.25 | greedy |" in policy_card


def test_card_without_config_or_results_says_so(tmp_path):
    from nemo_logitavg.release.model_card import write_model_card

    sft = make_llama_with_tokenizer(str(tmp_path / "sft"), seed=1)
    card = Path(write_model_card(sft)).read_text()
    assert "No training config was given" in card and "No evaluation was attached" in card


def test_kl_config_and_bundle_refusal(tmp_path):
    cfg = config_as_dict(GRPOConfig, ROOT / "configs" / "grpo_kl_8b.yaml", ["rollout.token=${oc.env:TOKEN}"])
    assert cfg["model"]["policy"] == "???" and cfg["rollout"]["token"] == "${oc.env:TOKEN}"  # nothing resolved
    with pytest.raises(SystemExit):  # a bundle of the KL baseline (ref_weight 0) is refused before any export
        args = ["--config", str(ROOT / "configs" / "grpo_kl_8b.yaml"), "model.policy=p", "--bundle", "b"]
        _convert_recipe().main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "o"), *args])
    assert not (tmp_path / "o").exists()

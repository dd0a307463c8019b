"""The model card (README.md) of a released Hugging Face directory: what the model is, how to load it, the
training config it came from and the evaluation table, when given. Written by recipes/convert_mcore_to_hf.py into
the policy directory and the averaged-model bundle."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import yaml

from nemo_logitavg.config import redact_secrets
from nemo_logitavg.models.bundle import BUNDLE_ARCHITECTURE
from nemo_logitavg.tables import markdown_table

AGGREGATE_COLUMNS = ("model", "mode", "dataset", "num_seeds", "num_problems", "accuracy_mean", "accuracy_std",
                     "ci_low", "ci_high", "has_boxed", "boxed_latex_valid", "mean_length")  # fmt: skip
COMPARISON_COLUMNS = ("model", "mode", "dataset", "baseline", "accuracy", "baseline_accuracy", "diff", "diff_ci_low",
                      "diff_ci_high", "verdict")  # fmt: skip

METHOD = """pi_mix is the softmax of the averaged logits of the trainable policy and the frozen SFT reference, at
reference weight `a` (Gan and Zhu, 2026, "Complementing reinforcement learning with SFT through logit averaging in
the post training of LLMs"); GRPO samples from pi_mix and optimises it, with no KL term:

    m(s) = (1 - a) * z_pol(s) + a * z_ref(s),    pi_mix(. | s) = softmax(m(s) / T)"""


def _setting(cfg: Mapping, dotted: str) -> object:
    node: object = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _training_section(cfg: Mapping) -> list[str]:
    a, beta = _setting(cfg, "algorithm.ref_weight"), _setting(cfg, "algorithm.beta") or 0.0
    method = f"logit-averaging GRPO, ref_weight a = {a}" if a else "GRPO on the policy alone"
    if beta:
        method += f", KL penalty beta = {beta} ({_setting(cfg, 'algorithm.kl_estimator')} estimator)"
    rows = [
        ("method", method),
        ("group size", _setting(cfg, "algorithm.group_size")),
        ("prompts per step", _setting(cfg, "rollout.prompts_per_step")),
        ("max response tokens", _setting(cfg, "rollout.max_tokens")),
        ("clip (low, high)", f"{_setting(cfg, 'algorithm.clip_low')}, {_setting(cfg, 'algorithm.clip_high')}"),
        ("loss aggregation", _setting(cfg, "algorithm.agg")),
        ("learning rate", _setting(cfg, "optim.lr")),
        ("steps", _setting(cfg, "run.steps")),
        ("training seed", _setting(cfg, "run.seed")),
        ("parallelism", f"TP{_setting(cfg, 'model.tensor_parallel')} x PP{_setting(cfg, 'model.pipeline_parallel')}"),
        ("training data", _setting(cfg, "data.train")),
    ]
    if _setting(cfg, "cluster") is not None:
        rows.append(("nodes", f"{_setting(cfg, 'cluster.trainer_nodes')} training + "
                              f"{_setting(cfg, 'cluster.rollout_nodes')} rollout"))  # fmt: skip
    table = ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    dumped = yaml.safe_dump(redact_secrets(cfg), sort_keys=False).rstrip()
    return ["## Training", "", *table, "", "<details><summary>The full training config</summary>", "",
            "```yaml", dumped, "```", "", "</details>"]  # fmt: skip


def _evaluation_section(results: Mapping) -> list[str]:
    out = [
        "## Evaluation",
        "",
        "Accuracy is the mean pass@1 over problems (greedy decoding is the headline), with the percentile-bootstrap "
        "95% interval over problems; the format columns are fractions of completions.",
        "",
    ]
    aggregate = [{k: row.get(k, "") for k in AGGREGATE_COLUMNS} for row in results.get("aggregate", [])]
    out.append(markdown_table(aggregate).rstrip())
    comparison = results.get("comparison") or []
    if comparison:
        out += ["", f"Against {comparison[0].get('baseline')}: the accuracy difference and its paired-bootstrap 95% "
                "interval (\"above\" when the interval excludes 0).", ""]  # fmt: skip
        out.append(markdown_table([{k: row.get(k, "") for k in COMPARISON_COLUMNS} for row in comparison]).rstrip())
    return out


def _usage(name: str, hf_config: Mapping, cfg: Mapping) -> list[str]:
    if BUNDLE_ARCHITECTURE in (hf_config.get("architectures") or []):
        what = (
            f"The averaged model pi_mix with reference weight a = {hf_config['ref_weight']}: the trained policy "
            "(`policy/`) and the frozen SFT reference (`reference/`, or the path in `config.json`), combined by "
            "averaging their logits. It is what was sampled and optimised in training, and the model to deploy."
        )
        code = [f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)  # pi_mix',
                f'tokenizer = AutoTokenizer.from_pretrained("{name}/policy")']  # fmt: skip
    else:
        a = _setting(cfg, "algorithm.ref_weight")
        what = f"A trained policy ({', '.join(hf_config.get('architectures') or ['causal LM'])}), a plain model."
        if a:
            what += (f" It was trained as the policy half of pi_mix (a = {a}); alone it is not the distribution that "
                     "was optimised: the averaged bundle is.")  # fmt: skip
        code = [f'model = AutoModelForCausalLM.from_pretrained("{name}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")']  # fmt: skip
    return [what, "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", *code, "```"]


def write_model_card(
    out_dir: str | os.PathLike, training_config: Mapping | None = None, results: Mapping | str | None = None
) -> str:
    """Write ``out_dir/README.md`` for the Hugging Face directory or averaged-model bundle at ``out_dir``.

    Args:
        training_config: the training run's config as a mapping (``config.config_as_dict``); its rollout token is
            never written.
        results: an evaluation ``results.json`` of recipes/evaluate.py (its path, or the loaded payload).

    Returns:
        The card's path.
    """
    out_dir = os.fspath(out_dir)
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as fh:
        hf_config = json.load(fh)
    if isinstance(results, (str, os.PathLike)):
        with open(results, encoding="utf-8") as fh:
            results = json.load(fh)
    name = os.path.basename(os.path.abspath(out_dir))
    header = ["---", "library_name: transformers", "pipeline_tag: text-generation",
              "tags: [nemo-logitavg, grpo, logit-averaging]", "---", "", f"# {name}", ""]  # fmt: skip
    lines = header + _usage(name, hf_config, training_config or {}) + ["", "## Method", "", METHOD, ""]
    if training_config:
        lines += [*_training_section(training_config), ""]
    else:
        lines += ["## Training", "", "No training config was given to the exporter.", ""]
    if results:
        lines += [*_evaluation_section(results), ""]
    else:
        lines += ["## Evaluation", "", "No evaluation was attached (recipes/evaluate.py writes results.json; "
                  "recipes/convert_mcore_to_hf.py --results adds it here).", ""]  # fmt: skip
    path = os.path.join(out_dir, "README.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    return path

"""The capacity planner: parameter counts against transformers, sharding arithmetic, the 70B figures, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_logitavg.models import LlamaConfig, padded_vocab_size
from nemo_logitavg.planning import (
    GIB,
    GPUSpec,
    RolloutLayout,
    TrainingLayout,
    check,
    format_plan,
    llama3_8b,
    llama3_70b,
    parameter_count,
    plan,
    stage_parameters,
)

ROOT = Path(__file__).resolve().parents[1]

TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2}  # fmt: skip


def hf_parameter_count(cfg: LlamaConfig) -> int:
    """Parameters of the same shape built by transformers (Qwen2 for q/k/v biases), tied weights counted once."""
    import torch
    import transformers

    kwargs = {**TINY, "tie_word_embeddings": cfg.tie_word_embeddings}
    if cfg.qkv_bias:
        model_cls, config_cls = transformers.Qwen2ForCausalLM, transformers.Qwen2Config
    else:
        model_cls, config_cls = transformers.LlamaForCausalLM, transformers.LlamaConfig
    with torch.device("meta"):
        model = model_cls(config_cls(**kwargs))
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


def layout(**kw) -> TrainingLayout:
    return TrainingLayout(**{"tp": 1, "pp": 1, "dp": 1, "micro_batch_size": 1, "seq_length": 128, **kw})


def line(side, name: str) -> float:
    return next(entry.bytes for entry in side.lines if entry.name == name)


ROLLOUT = RolloutLayout(tp=1, servers=1, max_seqs=1, max_context=16)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_parameter_count_matches_transformers(tied: bool, qkv_bias: bool) -> None:
    cfg = LlamaConfig(**TINY, tie_word_embeddings=tied, qkv_bias=qkv_bias)
    assert parameter_count(cfg) == hf_parameter_count(cfg)
    # One GPU, one stage, a vocabulary megatron does not pad (256 = 2 x 128): the stage holds the whole model.
    assert stage_parameters(cfg, tp=1, pp=1, stage=0) == hf_parameter_count(cfg)


def test_presets_have_the_published_sizes() -> None:
    assert parameter_count(llama3_8b()) == 8_030_261_248  # Llama-3.1-8B
    assert parameter_count(llama3_70b()) == 70_553_706_496  # Llama-3.3-70B


@pytest.mark.parametrize("tied", [False, True])
def test_sharding_arithmetic(tied: bool) -> None:
    cfg = LlamaConfig(**TINY, tie_word_embeddings=tied)
    h, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    norms = n_layers * 2 * h + h  # replicated over TP
    total = parameter_count(cfg)
    # TP: every rank holds 1/TP of the split parameters and all the norms.
    for tp in (2, 4):
        vp = padded_vocab_size(cfg.vocab_size, tp)
        assert vp == {2: 256, 4: 512}[tp]  # megatron pads to a multiple of 128 x TP
        pad = (vp - cfg.vocab_size) * h * (1 if tied else 2)
        assert tp * (stage_parameters(cfg, tp, 1, 0) - norms) == total - norms + pad
    # PP: the stages tile the model; tied embeddings are held by the first and the last stage.
    for pp in (2, 4):
        stages = [stage_parameters(cfg, 1, pp, i) for i in range(pp)]
        assert sum(stages) == total + (cfg.vocab_size * h if tied else 0)
        assert stages[0] == stages[-1] - h  # embedding vs output layer + final norm
    # DP: only the optimizer state shrinks, by exactly DP.
    one = plan(cfg, layout(), ROLLOUT).training
    four = plan(cfg, layout(dp=4), ROLLOUT).training
    assert line(four, "optimizer state") * 4 == line(one, "optimizer state") == 12 * total
    for name in ("policy weights", "gradients", "reference weights", "activations"):
        assert line(four, name) == line(one, name)
    assert line(one, "policy weights") == line(one, "reference weights") == 2 * total
    assert line(one, "gradients") == 4 * total


def test_activations_recompute_and_pipeline() -> None:
    cfg = LlamaConfig(**TINY)
    h, kvd, i, a = 64, 2 * 8, 96, 8
    per_token_layer = 8 * h + 4 * h + 4 * kvd + 6 * i + 4 * a
    full = plan(cfg, layout(seq_length=100, micro_batch_size=2), ROLLOUT).training
    assert line(full, "activations") == 200 * 4 * per_token_layer
    rec = plan(cfg, layout(seq_length=100, micro_batch_size=2, recompute=True), ROLLOUT).training
    assert line(rec, "activations") == 200 * (4 * 2 * h + per_token_layer)
    # PP2: stage 0 holds 2 micro-batches of its 2 layers, i.e. as many layer-activations as PP1 in total.
    pp2 = plan(cfg, layout(seq_length=100, micro_batch_size=2, pp=2), ROLLOUT)
    assert "stage 0" in pp2.training.where
    assert line(pp2.training, "activations") == line(full, "activations")


def test_logprob_buffers() -> None:
    cfg = LlamaConfig(**TINY)
    side = plan(cfg, layout(tp=2, seq_length=100, micro_batch_size=2), ROLLOUT).training
    vl = 128  # vocabulary 256 (a multiple of 128 x 2) over TP2
    assert line(side, "log-prob buffers") == 3 * 200 * vl * 2 + 4 * 200 * vl  # the chunk covers all 200 tokens


def test_kv_cache_by_hand() -> None:
    cfg = LlamaConfig(**TINY)  # 4 layers, 2 KV heads of dim 8
    r = RolloutLayout(tp=2, servers=3, max_seqs=5, max_context=7)
    side = plan(cfg, layout(), r).rollout
    # 2 models x 4 layers x (K, V) x 1 KV head a rank x 8 x 2 bytes x 35 tokens
    assert line(side, "KV cache (both stacks)") == 2 * 4 * 2 * 1 * 8 * 2 * 35 == 8960
    assert line(side, "policy + reference weights") == 2 * 2 * parameter_count(cfg) / 2
    assert side.gpus == 6


def test_70b_fits_with_recompute_and_refusal_names_the_component() -> None:
    train = TrainingLayout(tp=8, pp=4, dp=4, micro_batch_size=1, seq_length=4096, recompute=True)
    rollout = RolloutLayout(tp=8, servers=4, max_seqs=96, max_context=4096)
    result = check(plan(llama3_70b(), train, rollout))
    assert result.training.total < 74 * GIB and result.rollout.total < 74 * GIB
    assert "policy weights" in format_plan(result)
    assert 4.0 * GIB < line(result.training, "reference weights") < 4.5 * GIB  # docs/design.md §6: about 4 GB a GPU

    one_gpu = TrainingLayout(tp=1, pp=1, dp=1, micro_batch_size=1, seq_length=4096, recompute=True)
    with pytest.raises(ValueError, match=r"training GPU .*GiB needed > 74\.0 GiB available.*largest: optimizer state"):
        check(plan(llama3_70b(), one_gpu, rollout))
    with pytest.raises(ValueError, match=r"34\.0 GiB available \(40 GiB - 6 GiB reserve\)"):
        check(plan(llama3_70b(), train, rollout, GPUSpec(memory_gib=40, reserve_gib=6)))
    too_many = RolloutLayout(tp=8, servers=4, max_seqs=256, max_context=4096)
    with pytest.raises(ValueError, match=r"rollout GPU .*largest: KV cache .* 80\.0 GiB .*<= 129"):
        check(plan(llama3_70b(), train, too_many))
    with pytest.raises(ValueError, match="does not divide num_hidden_layers"):
        plan(llama3_70b(), TrainingLayout(tp=8, pp=3, dp=1, micro_batch_size=1, seq_length=16), rollout)


def run_recipe(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "plan.py"), *args], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip


def test_recipe_exit_codes() -> None:
    common = ["--model", "llama3-70b", "--micro-batch", "1", "--seq", "4096", "--recompute", "--rollout-tp", "8",
              "--rollout-servers", "4", "--rollout-seqs", "96", "--rollout-context", "4096"]  # fmt: skip
    ok = run_recipe(*common, "--tp", "8", "--pp", "4", "--dp", "4")
    assert ok.returncode == 0, ok.stderr
    assert "| optimizer state |" in ok.stdout and "fits" in ok.stdout
    bad = run_recipe(*common, "--tp", "1", "--pp", "1", "--dp", "1")
    assert bad.returncode == 1
    assert "training GPU" in bad.stderr and "largest: optimizer state" in bad.stderr


def test_recipe_reads_a_hf_directory(tmp_path: Path) -> None:
    import json

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **TINY}), encoding="utf-8"
    )
    out = run_recipe("--model", str(tmp_path), "--seq", "64", "--gpu-gib", "1", "--reserve-gib", "0.5")
    assert out.returncode == 0, out.stderr
    assert "GPUs: 1 training + 1 rollout" in out.stdout


def test_plan_of_the_shipped_70b_configs() -> None:
    """The cluster section gives the layout: 8 trainer nodes at TP8 x PP4 -> DP2; four TP8 servers holding both
    stacks (the README's figures), one stack for the KL baseline (ref_weight 0)."""
    from nemo_logitavg.config import GRPOConfig, load_config
    from nemo_logitavg.planning import plan_config

    cfg = load_config(GRPOConfig, ROOT / "configs" / "grpo_logitavg_70b.yaml", ["model.policy=llama3-70b"])
    result = check(plan_config(cfg.validate()))
    assert "TP8 x PP4 x DP2" in result.training.where and result.training.gpus == 64 and result.rollout.gpus == 32
    assert (round(result.training.total / GIB, 1), round(result.rollout.total / GIB, 1)) == (57.6, 73.5)
    assert "log-prob buffers 0.4" in result.training.note  # the last stage, where the pi_mix loss runs
    kl = load_config(GRPOConfig, ROOT / "configs" / "grpo_kl_70b.yaml", ["model.policy=llama3-70b"])
    kl_lines, lines = plan_config(kl).rollout.lines, result.rollout.lines
    for one, two in zip(kl_lines[:2], lines[:2], strict=True):  # weights and KV cache: one stack instead of two
        assert one.bytes == pytest.approx(two.bytes / 2)
    assert kl_lines[2].bytes == lines[2].bytes  # the engine workspace does not depend on the stacks


def test_shell_output_is_marked_and_refuses_line_breaks() -> None:
    """Every stdout line of --shell carries the mark launcher/common.sh evaluates; a value with a line break (it
    would spill onto an unmarked line) is refused, naming the variable."""
    cfg = ["--config", "configs/grpo_logitavg_8b.yaml", "model.policy=llama3-8b"]
    out = subprocess.run([sys.executable, "recipes/plan.py", "--shell", *cfg], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines and all(line.startswith("nla-shell: ") for line in lines), lines
    assert "nla-shell: export NLA_ROLLOUT_PORT=8000" in lines
    bad = subprocess.run([sys.executable, "recipes/plan.py", "--shell", *cfg, "run.dir=runs/a\ntouch x"],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         timeout=120)  # fmt: skip
    assert bad.returncode == 1 and bad.stdout == ""
    assert "NLA_OVERRIDES: 'run.dir=runs/a\\ntouch x' holds a line break" in bad.stderr


def test_engine_workspace_by_hand() -> None:
    cfg = LlamaConfig(**TINY)  # h 64, I 96, 2 KV heads of dim 8, vocabulary 256
    r = RolloutLayout(tp=2, servers=1, max_seqs=5, max_context=7, batched_tokens=100)
    side = plan(cfg, layout(), r).rollout
    # 100 tokens x 2 B x (2 x 64 + (64 + 2 x 16) / 2 + 3 x 96 / 2) + 4 x 4 B x 5 seqs x 256
    assert line(side, "engine workspace") == 100 * 2 * (128 + 48 + 144) + 16 * 5 * 256 == 84480


H100_CUDA_TOTAL = 81559 << 20  # an H100 80GB's 81559 MiB (79.6 GiB), the total vLLM's utilisation scales
VLLM_DEFAULT_UTILIZATION = 0.9  # vllm.config.CacheConfig.gpu_memory_utilization


@pytest.mark.parametrize("name", ["grpo_logitavg_70b", "grpo_logitavg_8b", "grpo_kl_70b", "grpo_kl_8b"])
def test_vllm_is_given_the_planned_memory(name: str, tmp_path: Path) -> None:
    """From the planner's shell output through launcher/common.sh's server YAML to the vLLM engine's arguments:
    vLLM's budget on an H100 (79.6 GiB reported) is the planner's available memory, its batch is the planned
    one, and what that budget leaves for the KV cache after the planned weights and workspace holds every
    planned sequence at the full context (128 x 4096 at 70B). vLLM's default 0.9 x 79.6 GiB did not."""
    import yaml

    from nemo_logitavg.config import GRPOConfig, load_config
    from nemo_logitavg.planning import plan_config
    from nemo_logitavg.rollout.vllm_engine import resolve_memory_budget

    model = "llama3-70b" if "70b" in name else "llama3-8b"
    config = f"configs/{name}.yaml"
    result = check(plan_config(load_config(GRPOConfig, ROOT / config, [f"model.policy={model}"]).validate()))
    out = subprocess.run([sys.executable, "recipes/plan.py", "--shell", "--config", config, f"model.policy={model}"],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    shell = "\n".join(line.removeprefix("nla-shell: ") for line in out.stdout.splitlines())
    yaml_path = tmp_path / "server.yaml"
    subprocess.run(["bash", "-c", f'{shell}\nsource launcher/common.sh && nla_vllm_config "$1"', "x",
                    str(yaml_path)], cwd=ROOT, check=True, timeout=60)  # fmt: skip
    given = resolve_memory_budget(yaml.safe_load(yaml_path.read_text())["vllm"], H100_CUDA_TOTAL)
    budget = given.get("gpu_memory_utilization", VLLM_DEFAULT_UTILIZATION) * H100_CUDA_TOTAL
    assert budget == pytest.approx(result.gpu.available, rel=1e-9)
    assert given["max_num_batched_tokens"] == RolloutLayout(1, 1, 1, 1).batched_tokens  # the planned workspace
    weights, kv, workspace = (line.bytes for line in result.rollout.lines)
    assert budget - weights - workspace >= kv  # vLLM's KV cache: its budget less weights and profiled memory
    seqs = 128 if "70b" in name else 96
    assert f"{seqs} seqs x 4096 tokens" in result.rollout.lines[1].formula

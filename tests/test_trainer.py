"""The GRPO step's pieces that need no server: packing rollouts, micro-batch loss normalisation, the config."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from nemo_logitavg.algorithms.grpo import policy_loss
from nemo_logitavg.config import GRPOConfig
from nemo_logitavg.seeds import step_seed
from nemo_logitavg.trainer import (
    RolloutProducer,
    make_loss_fn,
    micro_batches,
    pack_rollouts,
    plan_micro_batches,
    stale_prompts,
    step_counts,
)


@dataclass
class Completion:
    token_ids: list
    logprobs: list
    finish_reason: str = "stop"
    text: str = ""
    policy_step: int = 0


def test_pack_rollouts_layout():
    prompts = [[5, 6, 7], [8]]
    groups = [
        [Completion([1, 2], [-0.1, -0.2]), Completion([3], [-0.3], "length")],
        [Completion([4, 4, 4], [-0.4, -0.5, -0.6]), Completion([9], [-0.7])],
    ]
    batch = pack_rollouts(prompts, groups, [1.0, 0.0, 0.0, 0.0], group_size=2, mask_truncated=True)
    assert batch.input_ids.shape == (4, 4)  # longest sequence 5 tokens -> 4 positions
    assert batch.input_ids[0].tolist() == [5, 6, 7, 1] and batch.targets[0].tolist() == [6, 7, 1, 2]
    assert batch.mask[0].tolist() == [False, False, True, True]
    assert torch.allclose(batch.rollout_logprobs[0], torch.tensor([0.0, 0.0, -0.1, -0.2]))
    assert batch.mask[1].tolist() == [False] * 4, "a truncated completion is dropped with mask_truncated"
    assert batch.targets[2].tolist() == [4, 4, 4, 0] and batch.mask[2].tolist() == [True, True, True, False]
    assert batch.truncated.tolist() == [False, True, False, False]
    # Group-normalised advantages: group 1 has rewards (1, 0), group 2 (0, 0).
    assert batch.advantages[0] > 0 > batch.advantages[1] and batch.advantages[2:].abs().max() == 0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("budget", [None, 14], ids=["fixed-size", "token-budget"])
def test_micro_batch_losses_sum_to_the_step_loss(agg, budget):
    gen = torch.Generator().manual_seed(0)
    prompts = [[1, 2]] * 3
    groups = [
        [Completion(list(range(1 + (p + g) % 4 * 3)), (-torch.rand(1 + (p + g) % 4 * 3, generator=gen)).tolist(),
                    "length" if p == g == 1 else "stop")
         for g in range(4)]
        for p in range(3)
    ]  # fmt: skip
    rewards = torch.rand(12, generator=gen).tolist()
    # One truncated completion dropped from the loss: a sequence without tokens, which seq-mean-token-mean skips.
    batch = pack_rollouts(prompts, groups, rewards, group_size=4, mask_truncated=True)
    assert not batch.mask[5].any()
    # float64 throughout, so that the comparison is of the normalisation, not of float32 rounding.
    old_logprobs = batch.rollout_logprobs.double()
    new_logprobs = old_logprobs + 0.1 * torch.randn(old_logprobs.shape, generator=gen, dtype=torch.float64)
    cfg = SimpleNamespace(algorithm=SimpleNamespace(clip_low=0.2, clip_high=0.28, agg=agg, dual_clip=None, beta=0.0,
                                                    max_staleness=0, is_cap=2.0))  # fmt: skip
    expected, _ = policy_loss(new_logprobs, old_logprobs, batch.advantages, batch.mask,
                              clip_low=0.2, clip_high=0.28, agg=agg, max_response_length=8)  # fmt: skip
    loss_fn = make_loss_fn(cfg, *step_counts(cfg, batch.mask), max_response_length=8)
    if budget:
        plan = plan_micro_batches(batch.lengths.tolist(), list(range(12)), 1, max_tokens=budget)[0]
        assert len(plan) > 2 and all(len(rows) * int(batch.lengths[rows].max()) <= budget for rows in plan)
    else:
        plan = [range(0, 5), range(5, 10), range(10, 12)]
    total = 0.0
    for mb, rows in zip(micro_batches(batch, plan), plan, strict=True):
        rows = list(rows)
        width = mb["mask"].shape[1]
        assert width == int(batch.lengths[rows].max()), "each micro-batch is padded to its own longest only"
        mb["old_logprobs"] = mb["rollout_logprobs"].double()
        loss, _ = loss_fn(new_logprobs[rows, :width], torch.zeros(len(rows), width), mb)
        total += loss.item()
    assert total == pytest.approx(expected.item(), rel=1e-12)


def check_plan(plan: list, lengths: list, seqs: list, dp: int, budget: int) -> None:
    assert len(plan) == dp
    assert len({len(bins) for bins in plan}) == 1, "every DP rank runs the same number of micro-batches"
    assert sorted(s for bins in plan for rows in bins for s in rows) == sorted(seqs)
    assert len({sum(len(rows) for rows in bins) for bins in plan}) == 1, "equal sequences per DP rank"
    for bins in plan:
        for rows in bins:
            assert rows and len(rows) * max(lengths[s] for s in rows) <= budget
    tokens = [sum(lengths[s] for rows in bins for s in rows) for bins in plan]
    assert max(tokens) - min(tokens) <= max(lengths[s] for s in seqs), f"unbalanced DP token counts {tokens}"


@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize(
    "case",
    ["lognormal", "one-long-many-short", "all-at-budget", "spread-3-200"],
)
def test_token_budget_plan(dp, case):
    gen = torch.Generator().manual_seed(3)
    budget = 1024
    lengths = {
        "lognormal": torch.exp(torch.randn(64, generator=gen) * 0.8 + 4.85).clamp(3, 1024).long().tolist(),
        # one rank gets the long one and little else; the others need several micro-batches of short ones
        "one-long-many-short": [1000] + [300] * 3 + [2] * 12,
        "all-at-budget": [budget] * 16,
        "spread-3-200": torch.linspace(3, 200, 32).long().tolist(),
    }[case]
    seqs = list(range(len(lengths)))
    plan = plan_micro_batches(lengths, seqs, dp, max_tokens=budget)
    check_plan(plan, lengths, seqs, dp, budget)
    if case == "all-at-budget":
        assert all(len(bins) == 16 // dp for bins in plan)
    # a mini-batch that is a slice of the step's sequences
    sub = seqs[len(seqs) // 2 :]
    check_plan(plan_micro_batches(lengths, sub, dp, max_tokens=budget), lengths, sub, dp, budget)


def test_token_budget_packs_tighter_than_fixed_size():
    lengths = [200, 3, 5, 8, 100, 4, 6, 7]
    plan = plan_micro_batches(lengths, list(range(8)), 1, max_tokens=400)[0]
    # first-fit decreasing: 200 + 100 fill one micro-batch (2 x 200), the six short ones share another (6 x 8)
    assert plan == [[0, 4], [3, 7, 6, 2, 5, 1]]
    fixed = plan_micro_batches(lengths, list(range(8)), 2, size=2)
    assert fixed == [[[0, 2], [4, 6]], [[1, 3], [5, 7]]], "fixed size: every DP-th sequence, in order"


def test_sequence_longer_than_the_budget_names_the_key():
    with pytest.raises(ValueError, match=r"train\.max_tokens_per_micro_batch \(256\)"):
        plan_micro_batches([10, 300, 20, 5], [0, 1, 2, 3], 2, max_tokens=256)


def test_config_token_budget_is_checked():
    cfg = GRPOConfig()
    cfg.train.max_tokens_per_micro_batch = 100
    with pytest.raises(ValueError, match="train.max_tokens_per_micro_batch"):
        cfg.validate()  # below rollout.max_tokens (256)
    cfg.train.max_tokens_per_micro_batch = 2048
    cfg.rollout.prompts_per_step, cfg.algorithm.group_size, cfg.train.micro_batch_size = 3, 3, 2
    cfg.validate()  # the budget replaces micro_batch_size: 9 sequences need not split into micro-batches of 2


def test_step_seed_depends_on_run_and_step():
    assert step_seed(1, 0) == step_seed(1, 0)
    assert len({step_seed(1, s) for s in range(100)} | {step_seed(2, 0)}) == 101


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("ref_weight", 1.5, "algorithm.ref_weight"),
        ("group_size", 1, "algorithm.group_size"),
        ("agg", "sum", "algorithm.agg"),
        ("kl_estimator", "k4", "algorithm.kl_estimator"),
        ("top_p", 0.0, "algorithm.top_p"),
    ],
)
def test_config_validation_names_the_key(key, value, message):
    cfg = GRPOConfig()
    setattr(cfg.algorithm, key, value)
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_config_batch_split_is_checked():
    cfg = GRPOConfig()
    cfg.rollout.prompts_per_step, cfg.algorithm.group_size, cfg.train.micro_batch_size = 3, 3, 2
    with pytest.raises(ValueError, match=r"train\.micro_batch_size \(2\)"):
        cfg.validate()


def test_metrics_log_writes_jsonl_tensorboard_and_wandb_offline(tmp_path, monkeypatch, capsys):
    import json

    pytest.importorskip("wandb", reason="W&B logging is optional; install wandb to check it")
    from nemo_logitavg.trainer import MetricsLog

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(str(tmp_path), total_steps=2, wandb_project="nla-test", config={"seed": 1})
    log.write(1, {"reward/mean": 0.25, "loss": 0.5})
    log.write(2, {"reward/mean": 0.5, "loss": 0.25})
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and lines[1]["reward/mean"] == 0.5
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert "[grpo] step 2/2" in capsys.readouterr().out
    # A resumed job continues the same W&B run.
    run_id = (tmp_path / "wandb_run_id").read_text()
    MetricsLog(str(tmp_path), total_steps=3, wandb_project="nla-test").close()
    assert (tmp_path / "wandb_run_id").read_text() == run_id


def test_wandb_never_receives_the_rollout_token(tmp_path, monkeypatch):
    import secrets
    from dataclasses import asdict

    pytest.importorskip("wandb", reason="W&B logging is optional; install wandb to check it")
    from nemo_logitavg.trainer import MetricsLog

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    secret = "rollout-secret-" + secrets.token_hex(8)
    cfg = GRPOConfig()
    cfg.rollout.token = secret
    log = MetricsLog(str(tmp_path), total_steps=1, wandb_project="nla-test", config=asdict(cfg))  # as the trainer
    assert log.wandb.config["rollout"]["token"] == "<redacted>"
    assert log.wandb.config["rollout"]["max_tokens"] == cfg.rollout.max_tokens  # the rest is kept
    log.write(1, {"reward/mean": 0.25})
    log.close()
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.suffix == ".wandb" for path in files)  # the offline run's record, config included
    assert [path for path in files if secret.encode() in path.read_bytes()] == []
def test_planner_activations_follow_the_token_budget():
    from pathlib import Path

    from nemo_logitavg.config import load_config
    from nemo_logitavg.planning import plan_config

    config = Path(__file__).resolve().parent.parent / "configs" / "grpo_logitavg_8b.yaml"

    def activations(*overrides: str) -> float:
        cfg = load_config(GRPOConfig, config, ["model.policy=llama3-8b", *overrides]).validate()
        return next(line.bytes for line in plan_config(cfg).training.lines if line.name == "activations")

    shipped = activations()
    assert activations("train.max_tokens_per_micro_batch=16384") == pytest.approx(2 * shipped)
    # the shipped budget of 8192 tokens plans like two 4096-token sequences of the fixed-size path
    fixed = activations("train.max_tokens_per_micro_batch=null", "train.micro_batch_size=2")
    assert shipped == pytest.approx(fixed)


def test_stale_prompts_are_those_older_than_the_window():
    def group(*steps):
        return [Completion([1], [-0.1], policy_step=s) for s in steps]

    groups = [group(5, 5), group(4, 5), group(3, 5), group(4, 4)]
    assert stale_prompts(groups, step=5, max_staleness=1) == [2]
    assert stale_prompts(groups, step=5, max_staleness=0) == [1, 2, 3]
    assert stale_prompts(groups, step=6, max_staleness=2) == [2]
    with pytest.raises(RuntimeError, match="policy step 5 while the trainer is at step 4"):
        stale_prompts(groups, step=4, max_staleness=1)


def test_producer_samples_at_most_max_staleness_steps_ahead_of_the_push():
    import threading

    started, gate = [], threading.Event()

    def sample(step):
        started.append(step)
        if step == 3:
            gate.wait(5)  # the producer is mid-request when the trainer closes it
        return {"step": step}

    producer = RolloutProducer(sample, first_step=1, max_staleness=1, end=6)
    assert producer.take(1)[0] == {"step": 1} and producer.take(2)[0] == {"step": 2}
    assert started == [1, 2], "step 3 must wait for the push of step 2"
    producer.allow(2)
    gate.set()
    assert producer.take(3)[0] == {"step": 3}
    assert started == [1, 2, 3]
    producer.allow(5)  # the run ends at step 6: step 6 is never sampled
    assert producer.take(4)[0] == {"step": 4} and producer.take(5)[0] == {"step": 5}
    assert producer.close() == 0 and started == [1, 2, 3, 4, 5]


def test_producer_error_reaches_the_trainer():
    def sample(step):
        raise ValueError(f"server down at step {step}")

    producer = RolloutProducer(sample, first_step=0, max_staleness=2, end=10)
    with pytest.raises(RuntimeError, match="producer failed before step 0") as info:
        producer.take(0)
    assert "server down at step 0" in str(info.value.__cause__)
    producer.close()


def test_config_checks_async_keys():
    cfg = GRPOConfig()
    base = cfg.wait_bound()
    cfg.algorithm.max_staleness = -1
    with pytest.raises(ValueError, match="algorithm.max_staleness"):
        cfg.validate()
    cfg.algorithm.max_staleness, cfg.algorithm.is_cap = 1, 0.9
    with pytest.raises(ValueError, match="algorithm.is_cap"):
        cfg.validate()
    cfg.algorithm.is_cap = 2.0
    r = cfg.rollout
    assert cfg.wait_bound() - base == pytest.approx(base - r.push_timeout), "rollout + grading count twice"

"""The GRPO step's pieces that need no server: packing rollouts, micro-batch loss normalisation, the config."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from nemo_logitavg.algorithms.grpo import policy_loss
from nemo_logitavg.config import GRPOConfig
from nemo_logitavg.trainer import make_loss_fn, micro_batches, pack_rollouts, sample_seed


@dataclass
class Completion:
    token_ids: list
    logprobs: list
    finish_reason: str = "stop"
    text: str = ""


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
def test_micro_batch_losses_sum_to_the_step_loss(agg):
    gen = torch.Generator().manual_seed(0)
    prompts = [[1, 2]] * 3
    groups = [
        [Completion(list(range(1 + (p + g) % 4)), (-torch.rand(1 + (p + g) % 4, generator=gen)).tolist())
         for g in range(4)]
        for p in range(3)
    ]  # fmt: skip
    rewards = torch.rand(12, generator=gen).tolist()
    batch = pack_rollouts(prompts, groups, rewards, group_size=4)
    # float64 throughout, so that the comparison is of the normalisation, not of float32 rounding.
    old_logprobs = batch.rollout_logprobs.double()
    new_logprobs = old_logprobs + 0.1 * torch.randn(old_logprobs.shape, generator=gen, dtype=torch.float64)
    cfg = SimpleNamespace(algorithm=SimpleNamespace(clip_low=0.2, clip_high=0.28, agg=agg, dual_clip=None, beta=0.0))
    expected, _ = policy_loss(new_logprobs, old_logprobs, batch.advantages, batch.mask,
                              clip_low=0.2, clip_high=0.28, agg=agg, max_response_length=8)  # fmt: skip
    loss_fn = make_loss_fn(cfg, float(batch.mask.sum()), 12, max_response_length=8)
    total = 0.0
    for mb, idx in zip(micro_batches(batch, list(range(12)), 5), ([0, 5, 10]), strict=True):
        mb["old_logprobs"] = mb["rollout_logprobs"].double()
        rows = slice(idx, idx + mb["mask"].shape[0])
        loss, _ = loss_fn(new_logprobs[rows], torch.zeros_like(new_logprobs[rows]), mb)
        total += loss.item()
    if agg == "seq-mean-token-mean":
        # Every sequence here has tokens, so the mean of per-sequence means splits exactly by sequence share.
        assert batch.mask.any(1).all()
    assert total == pytest.approx(expected.item(), rel=1e-12)


def test_sample_seed_depends_on_run_and_step():
    assert sample_seed(1, 0) == sample_seed(1, 0)
    assert len({sample_seed(1, s) for s in range(100)} | {sample_seed(2, 0)}) == 101


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
    cfg.rollout.prompts_per_step, cfg.algorithm.group_size, cfg.rollout.micro_batch_size = 3, 3, 2
    with pytest.raises(ValueError, match="micro_batch_size"):
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

"""The logit-averaging actor under TP, PP and TP x PP against TP=1 x PP=1 on the same Hugging Face weights."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.tiny_models import TINY, make_hf_llama


def micro_batches(num: int = 2, batch: int = 2, seq: int = 12) -> list[dict]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(num):
        tokens = torch.randint(0, TINY["vocab_size"], (batch, seq + 1), generator=gen)
        out.append(
            {
                "input_ids": tokens[:, :-1],
                "targets": tokens[:, 1:],
                "position_ids": torch.arange(seq).expand(batch, -1),
                "weights": torch.randn(batch, seq, generator=gen),
            }
        )
    return out


def weighted_loss(logprobs, entropy, batch):
    # A fixed linear functional of log pi_mix, normalised over the whole step (2 micro-batches).
    loss = -(logprobs * batch["weights"]).sum() / (2 * logprobs.numel())
    return loss, {"loss": loss.detach().clone()}


def _actor_worker(tp: int, pp: int, policy_dir: str, reference_dir: str, ref_weight: float) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
    from nemo_logitavg.models.conversion.mapping import mcore_to_hf_state_dict
    from nemo_logitavg.parallel import init_parallel, teardown
    from tests.distributed import gather_mcore_shards

    init_parallel(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    cfg = LlamaConfig.from_hf(policy_dir)
    actor = LogitAveragingActor(cfg, LlamaConfig.from_hf(reference_dir), ActorConfig(ref_weight=ref_weight, lr=1e-2))
    actor.load_hf(policy_dir, reference_dir)
    # Data parallel: each DP rank takes its share of the step's micro-batches.
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    indices = list(range(dp_rank, len(micro_batches()), dp_size))
    results = actor.forward_backward([micro_batches()[i] for i in indices], weighted_loss)

    # Policy gradients in Hugging Face names, merged from every TP/PP shard; the reference has none.
    grads = {n: p.main_grad.detach().clone() for n, p in actor.gpt_policy.named_parameters()}

    class _Grads(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            return grads

    grad_grid = gather_mcore_shards(_Grads())
    reference_has_grad = any(
        p.grad is not None or getattr(p, "main_grad", None) is not None for p in actor.reference.parameters()
    )
    optimised = {id(p) for group in actor.optimizer.param_groups for p in group["params"]}
    reference_in_optimizer = any(id(p) in optimised for p in actor.reference.parameters())
    reference_before = {k: v.clone() for k, v in actor.reference.state_dict().items() if "extra_state" not in k}
    policy_before = {k: v.clone() for k, v in actor.gpt_policy.state_dict().items() if "extra_state" not in k}
    applied, grad_norm = actor.optimizer_step()
    reference_after = actor.reference.state_dict()
    policy_after = actor.gpt_policy.state_dict()
    out = {
        "rank": dist.get_rank(),
        "last_stage": ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0,
        "logprobs": dict(zip(indices, [r["logprobs"] for r in results], strict=True)) if results else {},
        "entropy": dict(zip(indices, [r["entropy"] for r in results], strict=True)) if results else {},
        "grads": mcore_to_hf_state_dict(grad_grid, cfg) if grad_grid is not None else None,
        "reference_has_grad": reference_has_grad,
        "reference_in_optimizer": reference_in_optimizer,
        "reference_state_in_optimizer": any(
            p in actor.optimizer.state for p in actor.reference.parameters()
        ) if hasattr(actor.optimizer, "state") else False,
        "applied": applied,
        "grad_norm": grad_norm,
        "reference_unchanged": all(torch.equal(v, reference_after[k]) for k, v in reference_before.items()),
        "policy_changed": sum(not torch.equal(v, policy_after[k]) for k, v in policy_before.items()),
        # A tensor may stay only where its gradient is zero (e.g. a TP shard holding only vocabulary padding).
        "unchanged": [k for k, v in policy_before.items() if torch.equal(v, policy_after[k]) and grads[k].any()],
        "policy_tensors": len(policy_before),
    }  # fmt: skip
    teardown()
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return make_hf_llama(root / "policy", seed=1), make_hf_llama(root / "reference", seed=2)


def run_layout(tp: int, pp: int, dirs, ref_weight: float = 0.5, dp: int = 1, timeout_s: float = 600.0) -> dict:
    ranks = run_distributed(
        _actor_worker, tp * pp * dp, timeout_s, tp=tp, pp=pp, policy_dir=dirs[0], reference_dir=dirs[1],
        ref_weight=ref_weight,
    )
    for r in ranks:
        assert not r["reference_has_grad"], f"TP={tp} PP={pp} rank {r['rank']}: the reference received a gradient"
        assert not r["reference_in_optimizer"] and not r["reference_state_in_optimizer"]
        assert r["applied"] and r["reference_unchanged"]
        assert not r["unchanged"], f"TP={tp} PP={pp} rank {r['rank']}: not updated by one Adam step: {r['unchanged']}"
        assert r["policy_changed"] > 0
    logprobs, entropy = {}, {}
    for r in ranks:
        if r["last_stage"]:
            logprobs.update(r["logprobs"])
            entropy.update(r["entropy"])
    return {"logprobs": [logprobs[i] for i in sorted(logprobs)], "entropy": [entropy[i] for i in sorted(entropy)],
            "grads": ranks[0]["grads"], "grad_norm": ranks[0]["grad_norm"]}  # fmt: skip


@pytest.fixture(scope="module")
def tied_hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tied")
    return make_hf_llama(root / "policy", seed=3, tie=True), make_hf_llama(root / "reference", seed=4, tie=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_same(base: dict, other: dict, tp: int, pp: int) -> None:
    for i, (a, b) in enumerate(zip(other["logprobs"], base["logprobs"], strict=True)):
        assert (a - b).abs().max() < 1e-5, f"TP={tp} PP={pp} micro-batch {i}: log pi_mix differs"
    for a, b in zip(other["entropy"], base["entropy"], strict=True):
        assert (a - b).abs().max() < 1e-4
    assert set(other["grads"]) == set(base["grads"])
    for name, grad in base["grads"].items():
        assert rel(other["grads"][name], grad) < 1e-5, f"TP={tp} PP={pp}: gradient of {name} differs"
    assert abs(other["grad_norm"] - base["grad_norm"]) / base["grad_norm"] < 1e-5


@pytest.mark.slow
def test_layouts_match_single_rank(hf_dirs):
    base = run_layout(1, 1, hf_dirs)
    assert set(base["grads"]) >= {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    for tp, pp in ((2, 1), (1, 2), (2, 2)):
        assert_same(base, run_layout(tp, pp, hf_dirs), tp, pp)


@pytest.mark.slow
def test_data_parallel_matches_single_rank(hf_dirs):
    # Each DP rank runs half of the step's micro-batches; the averaged gradient must equal the one-rank step's.
    base = run_layout(1, 1, hf_dirs)
    for tp in (1, 2):
        assert_same(base, run_layout(tp, 1, hf_dirs, dp=2), tp, 1)


@pytest.mark.slow
def test_tied_embeddings_under_pipeline_parallelism(tied_hf_dirs):
    # The embedding lives on the first stage and a copy feeds the output layer on the last: their gradients
    # must be summed across stages (finalize_model_grads on the policy chunks).
    base = run_layout(1, 1, tied_hf_dirs)
    assert "lm_head.weight" not in base["grads"]
    assert_same(base, run_layout(1, 2, tied_hf_dirs), 1, 2)


def test_logprobs_match_transformers(hf_dirs):
    """TP=2: the actor's log pi_mix equals log_softmax of the averaged transformers logits."""
    from transformers import AutoModelForCausalLM

    ref_weight = 0.3
    result = run_layout(2, 1, hf_dirs, ref_weight=ref_weight)
    policy = AutoModelForCausalLM.from_pretrained(hf_dirs[0], torch_dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(hf_dirs[1], torch_dtype=torch.float32).eval()
    for batch, logprobs in zip(micro_batches(), result["logprobs"], strict=True):
        with torch.no_grad():
            mixed = (1 - ref_weight) * policy(batch["input_ids"]).logits.double()
            mixed = mixed + ref_weight * reference(batch["input_ids"]).logits.double()
        expected = torch.log_softmax(mixed, -1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
        assert (logprobs.double() - expected).abs().max() < 1e-4


def test_mismatched_reference_is_refused():
    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.actor import check_same_layout

    a = LlamaConfig(**{k: v for k, v in TINY.items()})
    b = LlamaConfig(**{**TINY, "vocab_size": 101, "num_hidden_layers": 2})
    with pytest.raises(ValueError, match="vocab_size: policy 100 vs reference 101.*num_hidden_layers"):
        check_same_layout(a, b)


def _advantage_worker(policy_dir: str, reference_dir: str) -> dict:
    from nemo_logitavg.algorithms.grpo import policy_loss
    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
    from nemo_logitavg.parallel import init_parallel, teardown

    init_parallel(tensor_parallel_size=2)
    cfg = LlamaConfig.from_hf(policy_dir)
    actor = LogitAveragingActor(cfg, LlamaConfig.from_hf(reference_dir), ActorConfig(ref_weight=0.5, lr=1e-3))
    actor.load_hf(policy_dir, reference_dir)
    batch = micro_batches(num=1)[0]
    mask = torch.zeros_like(batch["targets"], dtype=torch.bool)
    mask[:, 6:] = True  # the "completion" part of each sequence
    batch["mask"] = mask
    before = actor.forward_backward([batch], forward_only=True)[0]["logprobs"]
    batch["old"] = before
    advantages = torch.tensor([1.0, -1.0])  # completion 0 rewarded, completion 1 penalised

    def grpo_loss(logprobs, entropy, mb):
        return policy_loss(logprobs, mb["old"], advantages, mb["mask"])

    actor.forward_backward([batch], grpo_loss)
    actor.optimizer_step()
    after = actor.forward_backward([batch], forward_only=True)[0]["logprobs"]
    teardown()
    return {"delta": ((after - before) * mask).sum(1)}


@pytest.mark.slow
def test_positive_advantage_raises_log_pi_mix(hf_dirs):
    delta = run_distributed(_advantage_worker, 2, policy_dir=hf_dirs[0], reference_dir=hf_dirs[1])[0]["delta"]
    assert delta[0] > 0 > delta[1], delta


def _nan_worker(policy_dir: str, reference_dir: str) -> dict:
    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
    from nemo_logitavg.parallel import init_parallel, teardown

    init_parallel(tensor_parallel_size=2)
    cfg = LlamaConfig.from_hf(policy_dir)
    actor = LogitAveragingActor(cfg, LlamaConfig.from_hf(reference_dir), ActorConfig(lr=1e-2))
    actor.load_hf(policy_dir, reference_dir)
    before = {k: v.clone() for k, v in actor.gpt_policy.state_dict().items() if "extra_state" not in k}

    def nan_loss(logprobs, entropy, mb):
        return logprobs.sum() * float("nan"), {}

    actor.forward_backward(micro_batches(num=1), nan_loss)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied, grad_norm = actor.optimizer_step()
    unchanged = all(torch.equal(v, actor.gpt_policy.state_dict()[k]) for k, v in before.items())
    # The next, finite step still works.
    actor.forward_backward(micro_batches(num=1), weighted_loss)
    applied_next, _ = actor.optimizer_step()
    out = {
        "applied": applied,
        "skipped": actor.skipped_steps,
        "warned": any("non-finite policy gradient" in str(w.message) for w in caught),
        "unchanged": unchanged,
        "applied_next": applied_next,
        "finite": actor.weights_finite(),
    }
    teardown()
    return out


@pytest.mark.slow
def test_non_finite_gradient_skips_the_update(hf_dirs):
    for rank in run_distributed(_nan_worker, 2, policy_dir=hf_dirs[0], reference_dir=hf_dirs[1]):
        assert not rank["applied"] and rank["skipped"] == 1 and rank["warned"] and rank["unchanged"]
        assert rank["applied_next"] and rank["finite"]


class _ReachedModel(Exception):
    """Raised by the hook below once the stage's inputs are recorded."""


def _batch_device_worker() -> dict:
    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
    from nemo_logitavg.parallel import init_parallel, rank_device, teardown

    init_parallel()
    cfg = LlamaConfig(**TINY)
    actor = LogitAveragingActor(cfg, cfg, ActorConfig())
    placed = {"actor": actor.device, "rank": rank_device(),
              "params": {p.device for m in (actor.gpt_policy, actor.reference) for p in m.parameters()}}  # fmt: skip
    seen: list = []

    def record(_module, args):
        seen.append({name: (t.device, t.tolist() if t.device.type != "meta" else None)
                     for name, t in zip(("input_ids", "position_ids", "targets"), args, strict=True)})  # fmt: skip
        raise _ReachedModel

    actor.stage.register_forward_pre_hook(record)
    batches = micro_batches(num=1)
    # Another device than the batches' (host) one: what reaches the model must have been moved there.
    actor.device = torch.device("meta")
    try:
        actor.forward_backward(batches, forward_only=True)
    except _ReachedModel:
        pass
    actor.device = placed["actor"]
    try:
        actor.forward_backward(batches, forward_only=True)
    except _ReachedModel:
        pass
    teardown()
    return {"placed": placed, "seen": seen, "host": {k: v.device for k, v in batches[0].items()}}


def test_forward_step_moves_micro_batches_to_the_actor_device():
    """Micro-batches built on the host are moved to ``actor.device`` inside the forward step, before the model."""
    (result,) = run_distributed(_batch_device_worker, world_size=1)
    placed = result["placed"]
    assert placed["actor"] == placed["rank"] and placed["params"] == {placed["rank"]}
    assert set(result["host"].values()) == {torch.device("cpu")}  # the caller's batch stays where it was
    on_meta, on_device = result["seen"]
    assert {device.type for device, _ in on_meta.values()} == {"meta"}
    batch = micro_batches(num=1)[0]
    for name, (device, values) in on_device.items():
        assert device == placed["rank"] and values == batch[name].tolist()

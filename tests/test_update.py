"""The GRPO update phase (``trainer.update_policy``) on a real actor over gloo processes: metrics reduced over
micro-batches and DP ranks, checked against DP=1 and against a plain-torch recomputation from the log-probs.

One set of processes per layout runs every case (a fresh actor per case), so the layouts' start-up is paid once.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tests.distributed import run_distributed
from tests.tiny_models import TINY, make_spread_llama

pytestmark = pytest.mark.slow
SHAPE = {**TINY, "max_position_embeddings": 256}
TIMING = ("time/", "throughput/")


@dataclass
class Completion:
    token_ids: list
    logprobs: list
    finish_reason: str = "stop"
    text: str = ""


def make_batch(completion_lengths: list[int], group_size: int, seed: int):
    """A step's batch: prompts of 2-5 tokens, completions of the given lengths, rewards in [0, 1]."""
    from nemo_logitavg.trainer import pack_rollouts

    gen = torch.Generator().manual_seed(seed)
    prompts, groups = [], []
    for p in range(len(completion_lengths) // group_size):
        prompts.append(torch.randint(4, SHAPE["vocab_size"], (2 + p % 4,), generator=gen).tolist())
        group = []
        for n in completion_lengths[p * group_size : (p + 1) * group_size]:
            tokens = torch.randint(4, SHAPE["vocab_size"], (n,), generator=gen).tolist()
            group.append(Completion(tokens, (-3 * torch.rand(n, generator=gen) - 1.5).tolist()))
        groups.append(group)
    rewards = torch.rand(len(completion_lengths), generator=gen).tolist()
    return pack_rollouts(prompts, groups, rewards, group_size)


# name -> (algorithm settings, rollout settings, batch)
CASES = {
    "token-mean-kl": (
        {"mini_batches": 2, "beta": 0.1, "agg": "token-mean"},
        {"micro_batch_size": 2},
        ([3, 9, 1, 14, 6, 2, 11, 5, 8, 4, 12, 7, 2, 10, 3, 6], 4, 11),
    ),
    "seq-mean-2-epochs": (
        {"mini_batches": 2, "epochs": 2, "agg": "seq-mean-token-mean", "clip_high": 0.28},
        {"micro_batch_size": 2},
        ([5, 2, 13, 7, 1, 9, 4, 12, 6, 3, 8, 10, 2, 5, 11, 4], 4, 12),
    ),
}


def _update_worker(tp: int, pp: int, policy_dir: str, reference_dir: str, cases: list[str]) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_logitavg.config import GRPOConfig
    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
    from nemo_logitavg.parallel import init_parallel, teardown
    from nemo_logitavg.trainer import update_policy

    init_parallel(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    reporter = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    out = {"rank": dist.get_rank(), "dp_rank": ps.get_data_parallel_rank(), "reporter": reporter, "cases": {}}
    for name in cases:
        algorithm, rollout, batch_args = CASES[name]
        cfg = GRPOConfig()
        cfg.algorithm.ref_weight, cfg.algorithm.clip_low, cfg.rollout.max_tokens = 0.5, 0.2, 16
        for key, value in algorithm.items():
            setattr(cfg.algorithm, key, value)
        for key, value in rollout.items():
            setattr(cfg.rollout, key, value)
        batch = make_batch(*batch_args)
        cfg.rollout.prompts_per_step = batch.input_ids.shape[0] // batch_args[1]
        cfg.algorithm.group_size = batch_args[1]
        cfg.validate()
        actor = LogitAveragingActor(
            LlamaConfig.from_hf(policy_dir), LlamaConfig.from_hf(reference_dir),
            ActorConfig(ref_weight=0.5, reference_logprobs=cfg.algorithm.beta > 0, lr=1e-3),
        )  # fmt: skip
        actor.load_hf(policy_dir, reference_dir)
        calls = []  # every forward_backward's micro-batches and results, as the schedule saw them
        forward_backward = actor.forward_backward

        def recording(mbs, loss_fn=None, forward_only=False, _fb=forward_backward, _calls=calls):
            results = _fb(mbs, loss_fn, forward_only=forward_only)
            _calls.append({"forward_only": forward_only, "mbs": [dict(mb) for mb in mbs], "results": results})
            return results

        actor.forward_backward = recording
        metrics = update_policy(cfg, actor, batch)
        out["cases"][name] = {
            "metrics": {k: v for k, v in metrics.items() if not k.startswith(TIMING)},
            "calls": calls if reporter else None,
            "batch": batch,
            "cfg": cfg,
        }
    teardown()
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return make_spread_llama(root / "policy", 1, SHAPE), make_spread_llama(root / "reference", 2, SHAPE)


@pytest.fixture(scope="module")
def layouts(hf_dirs):
    """``run(tp, pp, dp)``: every case on that layout, run once per module; rank results by rank."""
    done: dict = {}

    def run(tp: int, pp: int, dp: int) -> list[dict]:
        if (tp, pp, dp) not in done:
            done[tp, pp, dp] = run_distributed(
                _update_worker, tp * pp * dp, tp=tp, pp=pp, policy_dir=hf_dirs[0], reference_dir=hf_dirs[1],
                cases=list(CASES),
            )  # fmt: skip
        return done[tp, pp, dp]

    return run


def logged(ranks: list[dict], case: str) -> dict:
    """What ``GRPOTrainer.fit`` logs: rank 0's metrics, completed by the other ranks' (the last stage's)."""
    merged = dict(ranks[0]["cases"][case]["metrics"])
    for r in ranks[1:]:
        for key, value in r["cases"][case]["metrics"].items():
            merged.setdefault(key, value)
    return merged


def recompute(ranks: list[dict], case: str) -> dict:
    """The update's loss, KL and token metrics in plain float64 torch from the log-probs the actor returned.

    Gathers every reporting rank's micro-batches of every optimiser step by sequence, then applies the clipped
    surrogate and the aggregation of DESIGN §1/§7 over each optimiser step's whole mini-batch.
    """
    cfg = ranks[0]["cases"][case]["cfg"]
    alg = cfg.algorithm
    per_rank = [r["cases"][case]["calls"] for r in ranks if r["reporter"]]
    old_calls = [c[0] for c in per_rank]
    assert all(c["forward_only"] for c in old_calls)
    steps = len(per_rank[0]) - 1
    assert steps == alg.epochs * alg.mini_batches

    def rows(calls: list[dict], key: str) -> torch.Tensor:
        return torch.cat([torch.cat([r[key] for r in c["results"]]) for c in calls]).double()

    def field(calls: list[dict], key: str) -> torch.Tensor:
        return torch.cat([torch.cat([mb[key] for mb in c["mbs"]]) for c in calls])

    old_all = rows(old_calls, "logprobs")
    old_mask = field(old_calls, "mask")
    rollout = field(old_calls, "rollout_logprobs").double()
    mismatch = (old_all - rollout).abs()[old_mask]
    losses, kls, clip, approx, ratio_sum, entropy, tokens, ratio_max = [], [], 0.0, 0.0, 0.0, 0.0, 0, 0.0
    for o in range(steps):
        calls = [c[1 + o] for c in per_rank]
        new = rows(calls, "logprobs")
        mask = field(calls, "mask")
        adv = field(calls, "advantages").double()[:, None]
        # the old log-probs of exactly these rows: match micro-batches by their input ids
        old = torch.cat([mb["old_logprobs"] for c in calls for mb in c["mbs"]]).double()
        ratio = torch.exp(torch.where(mask, new - old, 0.0))
        token_loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - alg.clip_low, 1 + alg.clip_high))
        if alg.agg == "token-mean":

            def agg(x, mask=mask):
                return (x * mask).sum() / mask.sum()
        else:  # seq-mean-token-mean, every sequence here has tokens

            def agg(x, mask=mask):
                return ((x * mask).sum(1) / mask.sum(1)).mean()

        loss = agg(token_loss)
        if alg.beta > 0:
            ref = rows(calls, "ref_logprobs")
            kl = agg(torch.expm1(ref - new) - (ref - new))  # k3 = exp(-x) - 1 + x, x = new - ref
            kls.append(kl)
            loss = loss + alg.beta * kl
        losses.append(loss)
        clip += float(((-adv * ratio.clamp(1 - alg.clip_low, 1 + alg.clip_high) > -adv * ratio) & mask).sum())
        approx += float((((ratio - 1) - torch.log(ratio)) * mask).sum())
        ratio_sum += float((ratio * mask).sum())
        entropy += float((rows(calls, "entropy").detach() * mask).sum())
        tokens += int(mask.sum())
        ratio_max = max(ratio_max, float(ratio[mask].max()))
    expected = {
        "loss": float(torch.stack(losses).mean()),
        "clip_fraction": clip / tokens,
        "approx_kl": approx / tokens,
        "ratio_mean": ratio_sum / tokens,
        "ratio_max": ratio_max,
        "pi_mix_entropy": entropy / tokens,
        "mismatch/mean_abs": float(mismatch.mean()),
        "mismatch/max_abs": float(mismatch.max()),
    }
    if kls:
        expected["kl"] = float(torch.stack(kls).mean())
    return expected


@pytest.mark.parametrize("case", list(CASES))
def test_data_parallel_logs_the_same_metrics_as_one_rank(layouts, case):
    one, two = logged(layouts(1, 1, 1), case), logged(layouts(1, 1, 2), case)
    assert set(one) == set(two)
    for key in one:
        # ratio_max is one token's float32 ratio after the first update, whose weights differ from DP=1's by the
        # all-reduce's rounding: its log-ratio carries ~1 ulp of two log-probs of magnitude ~8 (~1e-6).
        rel = 1e-5 if key == "ratio_max" else 1e-6
        assert two[key] == pytest.approx(one[key], rel=rel, abs=1e-7), f"{case}: {key} DP=2 {two[key]} DP=1 {one[key]}"
    assert one["clip_fraction"] > 0, "the second mini-batch's ratios must move for the check to mean anything"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dp", [1, 2])
def test_logged_loss_matches_plain_torch(layouts, case, dp):
    ranks = layouts(1, 1, dp)
    got, expected = logged(ranks, case), recompute(ranks, case)
    assert set(expected) <= set(got)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), f"{case} DP={dp}: {key} {got[key]} vs {value}"

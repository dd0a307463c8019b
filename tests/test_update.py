"""The GRPO update phase (``trainer.update_policy``) on a real actor over gloo processes: metrics reduced over
micro-batches and DP ranks (checked against DP=1 and a plain-torch recomputation from the log-probs), token-budget
micro-batches against the fixed-size path at TP=2, PP=2 and DP=2, and the skipped old-log-prob pass.

One set of processes per layout runs every case (a fresh actor per case), so the layouts' start-up is paid once.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.test_trainer import Completion
from tests.tiny_models import TINY, make_spread_llama

pytestmark = pytest.mark.slow
SHAPE = {**TINY, "max_position_embeddings": 256}
TIMING = ("time/", "throughput/")


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


# Sequence lengths (prompt + completion tokens) from 3 to 200: the prompts of make_batch are 2-5 tokens.
SPREAD = ([1, 60, 198, 15, 7, 120, 33, 2, 90, 11, 150, 4, 45, 70, 9, 180], 4, 13)
# name -> (algorithm settings, rollout and train settings by "section.key", batch[, update_policy keywords])
CASES = {
    "token-mean-kl": (
        {"mini_batches": 2, "beta": 0.1, "agg": "token-mean"},
        {"train.micro_batch_size": 2},
        ([3, 9, 1, 14, 6, 2, 11, 5, 8, 4, 12, 7, 2, 10, 3, 6], 4, 11),
    ),
    "seq-mean-2-epochs": (
        {"mini_batches": 2, "epochs": 2, "agg": "seq-mean-token-mean", "clip_high": 0.28},
        {"train.micro_batch_size": 2},
        ([5, 2, 13, 7, 1, 9, 4, 12, 6, 3, 8, 10, 2, 5, 11, 4], 4, 12),
    ),
    # One update (the old log-probs are the update forward's own): fixed size against a token budget.
    "spread-fixed": ({"beta": 0.1}, {"train.micro_batch_size": 2, "rollout.max_tokens": 200}, SPREAD),
    "spread-budget": ({"beta": 0.1}, {"rollout.max_tokens": 200, "train.max_tokens_per_micro_batch": 400}, SPREAD),
    # The same update with the separate old-log-prob pass forced.
    "spread-old-pass": ({"beta": 0.1}, {"rollout.max_tokens": 200, "train.max_tokens_per_micro_batch": 400}, SPREAD,
                        {"reuse_update_logprobs": False}),
}  # fmt: skip


def _update_worker(tp: int, pp: int, policy_dir: str, reference_dir: str, cases: list[str]) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_logitavg.config import GRPOConfig
    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
    from nemo_logitavg.models.conversion.mapping import mcore_to_hf_state_dict
    from nemo_logitavg.parallel import init_parallel, teardown
    from nemo_logitavg.trainer import update_policy
    from tests.distributed import gather_mcore_shards

    init_parallel(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    reporter = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    out = {"rank": dist.get_rank(), "dp_rank": ps.get_data_parallel_rank(), "reporter": reporter, "cases": {}}
    for name in cases:
        algorithm, settings, batch_args, *keywords = CASES[name]
        cfg = GRPOConfig()
        cfg.algorithm.ref_weight, cfg.algorithm.clip_low, cfg.rollout.max_tokens = 0.5, 0.2, 16
        for key, value in algorithm.items():
            setattr(cfg.algorithm, key, value)
        for key, value in settings.items():
            section, attr = key.split(".")
            setattr(getattr(cfg, section), attr, value)
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
        metrics = update_policy(cfg, actor, batch, **(keywords[0] if keywords else {}))
        # The last optimiser step's policy gradients and the updated weights, in Hugging Face names.
        grads = {n: p.main_grad.detach().clone() for n, p in actor.gpt_policy.named_parameters()}

        class _Grads(torch.nn.Module):
            def state_dict(self, *args, _grads=grads, **kwargs):
                return _grads

        grad_grid, weight_grid = gather_mcore_shards(_Grads()), gather_mcore_shards(actor.gpt_policy)
        model_cfg = LlamaConfig.from_hf(policy_dir)
        out["cases"][name] = {
            "metrics": {k: v for k, v in metrics.items() if not k.startswith(TIMING)},
            "grads": mcore_to_hf_state_dict(grad_grid, model_cfg) if grad_grid is not None else None,
            "weights": mcore_to_hf_state_dict(weight_grid, model_cfg) if weight_grid is not None else None,
            "micro_batches": [len(c["mbs"]) for c in calls],
            "shapes": [tuple(mb["input_ids"].shape) for mb in calls[-1]["mbs"]],
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

    Collects every reporting rank's sequences of every optimiser step (their counted tokens only, whatever the
    micro-batch layout), then applies the clipped surrogate and the aggregation of docs/design.md §1/§7 over each
    optimiser step's whole mini-batch.
    """
    alg = ranks[0]["cases"][case]["cfg"].algorithm
    per_rank = [r["cases"][case]["calls"] for r in ranks if r["reporter"]]
    separate = per_rank[0][0]["forward_only"]  # False: the update forward's own log-probs were the old ones
    steps = len(per_rank[0]) - separate
    assert steps == alg.epochs * alg.mini_batches

    def sequences(calls: list[dict]) -> list[dict]:
        out = []
        for call in calls:
            for mb, result in zip(call["mbs"], call["results"], strict=True):
                for i, mask in enumerate(mb["mask"]):
                    seq = {"adv": float(mb["advantages"][i]), "rollout": mb["rollout_logprobs"][i][mask].double()}
                    for key in ("logprobs", "entropy", "ref_logprobs"):
                        if key in result:
                            seq[key] = result[key][i][mask].detach().double()
                    # the old pass itself, or an update that reused its own log-probs: old = these log-probs
                    seq["old"] = mb["old_logprobs"][i][mask].double() if "old_logprobs" in mb else seq["logprobs"]
                    out.append(seq)
        return out

    first = sequences([c[0] for c in per_rank])
    mismatch = torch.cat([(s["old"] - s["rollout"]).abs() for s in first])
    losses, kls, clip, approx, ratio_sum, entropy, tokens, ratio_max = [], [], 0.0, 0.0, 0.0, 0.0, 0, 0.0
    for o in range(steps):
        seqs = sequences([c[separate + o] for c in per_rank])

        def agg(per_token: list[torch.Tensor]) -> torch.Tensor:
            if alg.agg == "token-mean":
                return torch.cat(per_token).sum() / sum(len(t) for t in per_token)
            return torch.stack([t.mean() for t in per_token if len(t)]).mean()  # seq-mean-token-mean

        token_losses = []
        for seq in seqs:
            ratio = torch.exp(seq["logprobs"] - seq["old"])
            clipped = -seq["adv"] * ratio.clamp(1 - alg.clip_low, 1 + alg.clip_high)
            token_losses.append(torch.maximum(-seq["adv"] * ratio, clipped))
            clip += float((clipped > -seq["adv"] * ratio).sum())
            approx += float(((ratio - 1) - torch.log(ratio)).sum())
            ratio_sum += float(ratio.sum())
            entropy += float(seq["entropy"].sum())
            tokens += len(ratio)
            ratio_max = max([ratio_max, *ratio.tolist()])
        loss = agg(token_losses)
        if alg.beta > 0:
            x = [s["logprobs"] - s["ref_logprobs"] for s in seqs]
            kl = agg([torch.expm1(-t) + t for t in x])  # k3 = exp(-x) - 1 + x
            kls.append(kl)
            loss = loss + alg.beta * kl
        losses.append(loss)
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


METRIC_CASES = ["token-mean-kl", "seq-mean-2-epochs"]


@pytest.mark.parametrize("case", METRIC_CASES)
def test_data_parallel_logs_the_same_metrics_as_one_rank(layouts, case):
    one, two = logged(layouts(1, 1, 1), case), logged(layouts(1, 1, 2), case)
    assert set(one) == set(two)
    for key in one:
        # ratio_max is one token's float32 ratio after the first update, whose weights differ from DP=1's by the
        # all-reduce's rounding: its log-ratio carries ~1 ulp of two log-probs of magnitude ~8 (~1e-6).
        rel = 1e-5 if key == "ratio_max" else 1e-6
        assert two[key] == pytest.approx(one[key], rel=rel, abs=1e-7), f"{case}: {key} DP=2 {two[key]} DP=1 {one[key]}"
    assert one["clip_fraction"] > 0, "the second mini-batch's ratios must move for the check to mean anything"


@pytest.mark.parametrize("case", [*METRIC_CASES, "spread-budget", "spread-old-pass"])
@pytest.mark.parametrize("dp", [1, 2])
def test_logged_loss_matches_plain_torch(layouts, case, dp):
    ranks = layouts(1, 1, dp)
    got, expected = logged(ranks, case), recompute(ranks, case)
    assert set(expected) <= set(got)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), f"{case} DP={dp}: {key} {got[key]} vs {value}"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def assert_same_update(got: dict, want: dict, what: str, tol: float = 1e-5) -> None:
    assert set(got["metrics"]) == set(want["metrics"]), what
    for key, value in want["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=tol, abs=1e-7), f"{what}: {key}"
    assert set(got["grads"]) == set(want["grads"]), what
    for name, grad in want["grads"].items():
        assert rel(got["grads"][name], grad) <= tol, f"{what}: gradient of {name}: {rel(got['grads'][name], grad)}"


LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["single", "TP2", "PP2", "DP2"])
def test_token_budget_update_equals_fixed_size(layouts, layout):
    ranks = layouts(*layout)
    fixed, budget = ranks[0]["cases"]["spread-fixed"], ranks[0]["cases"]["spread-budget"]
    merged = [dict(c, metrics=logged(ranks, name)) for c, name in ((fixed, "spread-fixed"), (budget, "spread-budget"))]
    assert_same_update(merged[1], merged[0], f"layout {layout}: token budget vs fixed size")
    # ... and equals the single-rank update (PP=2 on gloo against PP=1, TP=2 against TP=1).
    single = layouts(1, 1, 1)
    assert_same_update(merged[1], dict(single[0]["cases"]["spread-budget"], metrics=logged(single, "spread-budget")),
                       f"layout {layout} against one rank")  # fmt: skip
    # The budget removed padding: fewer padded tokens than the fixed size's.
    padded = {name: sum(b * s for b, s in ranks[0]["cases"][name]["shapes"]) for name in ("spread-fixed",
                                                                                          "spread-budget")}
    assert padded["spread-budget"] < padded["spread-fixed"] / 2, padded
    if layout[1] > 1:
        assert len(set(budget["shapes"])) > 1, "the pipeline carried micro-batches of different shapes"


def test_every_dp_rank_runs_the_same_number_of_micro_batches(layouts):
    ranks = layouts(1, 1, 2)
    counts = [r["cases"]["spread-budget"]["micro_batches"] for r in ranks]
    shapes = [r["cases"]["spread-budget"]["shapes"] for r in ranks]
    assert counts[0] == counts[1] and counts[0][0] > 1, counts
    assert shapes[0] != shapes[1], "each DP rank's micro-batches are its own"
    tokens = [sum(b * s for b, s in shape) for shape in shapes]
    assert max(tokens) <= 400 * counts[0][0]


def test_skipping_the_old_pass_is_the_same_update_bit_for_bit(layouts):
    ranks = layouts(1, 1, 1)
    skipped, computed = ranks[0]["cases"]["spread-budget"], ranks[0]["cases"]["spread-old-pass"]
    assert skipped["micro_batches"] == computed["micro_batches"][1:], "one forward pass fewer"
    assert len(computed["micro_batches"]) == 2 and len(skipped["micro_batches"]) == 1
    assert skipped["metrics"] == computed["metrics"]
    for name, weight in computed["weights"].items():
        assert torch.equal(skipped["weights"][name], weight), name
    for name, grad in computed["grads"].items():
        assert torch.equal(skipped["grads"][name], grad), name

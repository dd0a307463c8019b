"""The update phase of one GRPO step: fixed-size micro-batches against token-budget ones, and the skipped pass.

    python -m tests.benchmarks.bench_update_batching [--repeats 3]

One TP=2 process group builds the logit-averaging actor (policy + frozen reference; 8 layers, hidden 256,
vocabulary 8192, random weights: speed does not depend on their values) and one step's batch: 64 sequences
(8 prompts x 8) with lognormal lengths (median 128 tokens, sigma 1, fixed seed), clipped at 1024, one sequence
at exactly 1024. It then times ``trainer.update_policy`` (old log-probs + forward/backward + optimiser step,
epochs 1, mini_batches 1) in three settings, interleaved, ``repeats`` times each after one warm-up of each:

- ``fixed``: ``train.micro_batch_size: 4``, every sequence padded to the step's longest (the path before
  issue 15), with the separate old-log-prob pass;
- ``budget``: ``train.max_tokens_per_micro_batch: 4096`` (4 x 1024), with the separate pass;
- ``budget_skip``: the same budget, the old log-probs taken from the update forward (the default when a
  rollout step makes one optimiser step).

Prints one JSON object: the lengths' summary, padded tokens per pass, each setting's median seconds, and the
ratios fixed / budget and budget / budget_skip.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from tests.distributed import run_distributed

SHAPE = dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=1024)  # fmt: skip
SEQUENCES, GROUP, PROMPT, MAX_LEN, SEED = 64, 8, 16, 1024, 0
SETTINGS = {
    "fixed": ({"micro_batch_size": 4}, False),
    "budget": ({"max_tokens_per_micro_batch": 4 * 1024}, False),
    "budget_skip": ({"max_tokens_per_micro_batch": 4 * 1024}, True),
}


def lengths() -> list[int]:
    """Sequence lengths in tokens (prompt + completion): lognormal, median 128, clipped at 1024, one at 1024."""
    gen = torch.Generator().manual_seed(SEED)
    out = torch.exp(math.log(128) + torch.randn(SEQUENCES, generator=gen)).round().clamp(PROMPT + 1, MAX_LEN)
    out[int(torch.randint(SEQUENCES, (1,), generator=gen))] = MAX_LEN
    return out.long().tolist()


def make_batch():
    from dataclasses import dataclass

    from nemo_logitavg.trainer import pack_rollouts

    @dataclass
    class Completion:
        token_ids: list
        logprobs: list
        finish_reason: str = "stop"

    gen = torch.Generator().manual_seed(SEED + 1)
    sizes = lengths()
    vocab = SHAPE["vocab_size"]
    prompts = [torch.randint(4, vocab, (PROMPT,), generator=gen).tolist() for _ in range(SEQUENCES // GROUP)]
    groups = [[Completion(torch.randint(4, vocab, (n - PROMPT,), generator=gen).tolist(),
                          [-1.0] * (n - PROMPT)) for n in sizes[p * GROUP : (p + 1) * GROUP]]
              for p in range(len(prompts))]  # fmt: skip
    rewards = torch.rand(SEQUENCES, generator=gen).tolist()
    return pack_rollouts(prompts, groups, rewards, GROUP)


def _worker(repeats: int) -> dict:
    import torch.distributed as dist

    from nemo_logitavg.config import GRPOConfig
    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
    from nemo_logitavg.parallel import init_parallel, teardown
    from nemo_logitavg.trainer import build_micro_batches, update_policy

    init_parallel(tensor_parallel_size=2)
    torch.manual_seed(0)
    model = LlamaConfig(**SHAPE)
    actor = LogitAveragingActor(model, model, ActorConfig(ref_weight=0.5, lr=1e-6))
    batch = make_batch()
    configs, padded = {}, {}
    for name, (train, _) in SETTINGS.items():
        cfg = GRPOConfig()
        cfg.rollout.prompts_per_step, cfg.algorithm.group_size = SEQUENCES // GROUP, GROUP
        cfg.rollout.max_tokens = MAX_LEN
        for key, value in train.items():
            setattr(cfg.train, key, value)
        configs[name] = cfg.validate()
        mbs = build_micro_batches(cfg, batch, [list(range(SEQUENCES))], 0, 1)[0]
        padded[name] = {"micro_batches": len(mbs), "padded_tokens": sum(mb["input_ids"].numel() for mb in mbs)}
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for round_ in range(repeats + 1):  # round 0 warms up
        for name, (_, skip) in SETTINGS.items():
            dist.barrier()
            start = time.perf_counter()
            metrics = update_policy(configs[name], actor, batch, reuse_update_logprobs=skip)
            dist.barrier()
            if round_:
                times[name].append(time.perf_counter() - start)
            if dist.get_rank() == 0:  # the old-log-prob pass and the forward/backward + optimiser step apart
                print(f"[bench] round {round_} {name}: {time.perf_counter() - start:.1f} s (old log-probs "
                      f"{metrics['time/old_logprobs_s']:.1f} s, update {metrics['time/update_s']:.1f} s)", flush=True)
    teardown()
    return {"times": times, "padded": padded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = run_distributed(_worker, 2, timeout_s=6 * 3600, repeats=args.repeats)[0]
    sizes = lengths()
    median = {name: statistics.median(t) for name, t in result["times"].items()}
    print(json.dumps({
        "lengths": {"count": len(sizes), "median": statistics.median(sizes), "mean": statistics.mean(sizes),
                    "max": max(sizes), "min": min(sizes), "tokens": sum(sizes)},
        "per_pass": result["padded"],
        "times_s": result["times"],
        "median_s": median,
        "fixed_over_budget": median["fixed"] / median["budget"],
        "budget_over_budget_skip": median["budget"] / median["budget_skip"],
        "fixed_over_budget_skip": median["fixed"] / median["budget_skip"],
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

"""Memory and step time of the logit-averaging actor against the policy alone.

    python -m tests.benchmarks.bench_actor [--tp 1 2] [--steps 6]

For each model size and TP, two fresh process groups build (a) the actor (trainable policy + frozen reference)
and (b) the policy alone (`reference_cfg=None`), each with megatron's DDP and Adam, then time `steps` training
steps (forward_backward over 2 micro-batches + optimizer step; the first is a warm-up). Memory per rank is
counted from the tensors themselves (parameters, DDP gradient buffers, optimiser state), plus the process's
peak RSS. Random weights: speed and memory do not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch

from tests.distributed import run_distributed

SIZES = {
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4),
}  # fmt: skip


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _worker(size: str, with_reference: bool, steps: int, batch: int, seq: int, threads: int) -> dict:
    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
    from nemo_logitavg.parallel import init_parallel, teardown

    torch.set_num_threads(threads)
    init_parallel(tensor_parallel_size=int(os.environ["WORLD_SIZE"]))
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=seq)
    torch.manual_seed(0)
    actor = LogitAveragingActor(cfg, cfg if with_reference else None, ActorConfig(ref_weight=0.5, lr=1e-5))
    gen = torch.Generator().manual_seed(1)
    micro = []
    for _ in range(2):
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen)
        micro.append({"input_ids": tokens[:, :-1], "targets": tokens[:, 1:],
                      "position_ids": torch.arange(seq).expand(batch, -1)})  # fmt: skip

    def loss_fn(logprobs, entropy, mb):
        return -logprobs.sum() / (2 * logprobs.numel()), {}

    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        actor.forward_backward(micro, loss_fn)
        actor.optimizer_step()
        if step:
            times.append(time.perf_counter() - start)
    policy_params = _bytes(actor.gpt_policy.parameters())
    reference_params = _bytes(actor.reference.parameters()) if actor.reference is not None else 0
    grad_buffers = _bytes(buf.grad_data for buf in actor.policy.buffers)
    opt_state = _bytes(
        v for opt in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
        for state in opt.optimizer.state.values() for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )  # fmt: skip
    teardown()
    return {
        "median_step_s": statistics.median(times),
        "policy_params": policy_params,
        "reference_params": reference_params,
        "grad_buffers": grad_buffers,
        "optimizer_state": opt_state,
        "total": policy_params + reference_params + grad_buffers + opt_state,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    mib = 2**20
    rows = []
    for size in args.sizes:
        for tp in args.tp:
            threads = max(1, (os.cpu_count() or 1) // tp)
            result = {}
            for label, with_ref in (("policy alone", False), ("actor", True)):
                ranks = run_distributed(_worker, tp, size=size, with_reference=with_ref, steps=args.steps,
                                        batch=args.batch, seq=args.seq, threads=threads)  # fmt: skip
                result[label] = {k: max(r[k] for r in ranks) for k in ranks[0]}
            rows.append((size, tp, result))
            print(json.dumps({"size": size, "tp": tp, **result}), flush=True)

    print(f"\n{args.batch}x{args.seq} tokens x 2 micro-batches per step, median of {args.steps} steps, "
          f"{os.cpu_count()} cores; memory per rank (max over ranks) in MiB")  # fmt: skip
    print("| model | TP | run | params (policy + ref) | grad buffers | Adam state | total | vs policy alone "
          "| peak RSS | step (s) | step vs policy alone |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, tp, result in rows:
        base = result["policy alone"]
        for label, r in result.items():
            print(
                f"| {size} | {tp} | {label} | {r['policy_params'] / mib:.1f} + {r['reference_params'] / mib:.1f} "
                f"| {r['grad_buffers'] / mib:.1f} | {r['optimizer_state'] / mib:.1f} | {r['total'] / mib:.1f} "
                f"| {r['total'] / base['total']:.2f} | {r['peak_rss'] / mib:.0f} | {r['median_step_s']:.3f} "
                f"| {r['median_step_s'] / base['median_step_s']:.2f} |"
            )


if __name__ == "__main__":
    main()

"""Benchmark mixed_logprobs forward+backward against the naive path and megatron-core's cross entropy.

    python -m tests.benchmarks.bench_mixed_logprobs [--tokens 4096] [--vocab 32768] [--tp 1 2] [--reps 5]

Each (method, TP) runs in fresh processes so that peak RSS belongs to that method alone:
- mixed:  nemo_logitavg.ops.mixed_logprobs on both models' vocab shards (chunked, fused backward);
- naive:  gather the vocabulary, average, float32 log_softmax, gather the target (autograd throughout);
- mcore:  megatron-core's vocab_parallel_cross_entropy on the policy logits alone (one model, the floor).
Time is the median over --reps of forward+backward (after one warm-up); peak extra memory is
ru_maxrss minus the RSS once the inputs exist, the maximum over TP ranks. The inputs are float32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import psutil
import torch
import torch.distributed as dist

from tests.distributed import run_distributed


def _worker(method: str, tokens: int, vocab: int, reps: int, threads: int) -> dict:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region, vocab_parallel_cross_entropy

    from nemo_logitavg.ops import mixed_logprobs
    from nemo_logitavg.parallel import init_parallel, teardown

    torch.set_num_threads(threads)
    world = int(os.environ["WORLD_SIZE"])
    init_parallel(tensor_parallel_size=world)
    group = parallel_state.get_tensor_model_parallel_group()
    v_local = vocab // world
    gen = torch.Generator().manual_seed(dist.get_rank())
    policy_base = torch.randn(tokens, v_local, generator=gen) * 3
    ref = torch.randn(tokens, v_local, generator=gen) * 3
    target = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(7))

    def step(policy: torch.Tensor) -> None:
        if method == "mixed":
            logprobs = mixed_logprobs(policy, ref, target, 0.5, tp_group=group)
        elif method == "naive":
            full_pol = gather_from_tensor_model_parallel_region(policy)
            full_ref = gather_from_tensor_model_parallel_region(ref)
            mixed = 0.5 * full_pol.float() + 0.5 * full_ref.float()
            logprobs = torch.log_softmax(mixed, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        else:
            logprobs = -vocab_parallel_cross_entropy(policy, target)
        logprobs.sum().backward()

    times = []
    rss_before = None
    for rep in range(reps + 1):
        policy = policy_base.clone().requires_grad_()
        if rss_before is None:
            rss_before = psutil.Process().memory_info().rss
        dist.barrier()
        start = time.perf_counter()
        step(policy)
        dist.barrier()
        if rep:  # the first is a warm-up
            times.append(time.perf_counter() - start)
        del policy
    peak_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    teardown()
    return {"median_s": statistics.median(times), "times": times, "peak_extra_bytes": peak_extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    results = []
    for tp in args.tp:
        threads = max(1, (os.cpu_count() or 1) // tp)
        for method in ("mcore", "mixed", "naive"):
            ranks = run_distributed(
                _worker, tp, method=method, tokens=args.tokens, vocab=args.vocab, reps=args.reps, threads=threads
            )
            row = {
                "tp": tp,
                "method": method,
                "median_s": max(r["median_s"] for r in ranks),
                "peak_extra_mib": max(r["peak_extra_bytes"] for r in ranks) / 2**20,
            }
            results.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{args.tokens} tokens x {args.vocab} vocabulary, float32, median of {args.reps}, {os.cpu_count()} cores")
    print("| TP | method | median fwd+bwd (s) | time / mcore | peak extra (MiB) | memory / naive |")
    print("|---|---|---|---|---|---|")
    for row in results:
        same_tp = {r["method"]: r for r in results if r["tp"] == row["tp"]}
        print(
            f"| {row['tp']} | {row['method']} | {row['median_s']:.3f} | "
            f"{row['median_s'] / same_tp['mcore']['median_s']:.2f} | {row['peak_extra_mib']:.0f} | "
            f"{row['peak_extra_mib'] / same_tp['naive']['peak_extra_mib']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()

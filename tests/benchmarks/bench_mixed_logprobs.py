"""Benchmark mixed_logprobs forward+backward against megatron-core's cross entropy and the naive path.

    python -m tests.benchmarks.bench_mixed_logprobs [--tokens 4096] [--vocab 32768] [--tp 1 2] [--reps 7]

Methods, on float32 logits, each TP rank a gloo process:
- mcore:  megatron-core's vocab_parallel_cross_entropy on the policy logits alone (one model: the floor),
          called on ``[s, b, V]`` logits and ``[s, b]`` labels as GPTModel calls it (b = --batch);
- mixed:  nemo_logitavg.ops.mixed_logprobs on both models' vocab shards (chunked, gradient written in the
          forward); ``mixed@N`` (--mixed-chunks N) the same with chunks of N logits instead of the default;
- naive:  gather the vocabulary, average, float32 log_softmax, gather the target (autograd throughout).

Time: one set of TP processes runs every method, alternating within each repetition (the order rotates), so
that all methods see the same machine load; the median over --reps of forward+backward after one warm-up
round. Every call gets a fresh clone of the logits made outside the timed region (mcore overwrites a
float32 input in place). Peak extra memory: a fresh set of processes per method runs one forward+backward;
ru_maxrss minus the RSS once the inputs (and that call's clone) exist, the maximum over TP ranks.
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

METHODS = ("mcore", "mixed", "naive")


def _worker(methods: list[str], tokens: int, vocab: int, batch: int, reps: int, threads: int) -> dict:
    """Time (and measure) each of ``methods``; ``mixed@N`` is mixed_logprobs with chunks of N logits."""
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
    seq = tokens // batch
    # GPTModel: logits [s, b, V], labels [b, s] transposed to [s, b] (compute_language_model_loss).
    labels_sb = target.view(batch, seq).transpose(0, 1).contiguous()

    def step(method: str, policy: torch.Tensor) -> None:
        if method.startswith("mixed"):
            chunk = max(1, int(method.split("@")[1]) // v_local) if "@" in method else None
            logprobs = mixed_logprobs(policy, ref, target, 0.5, tp_group=group, chunk_size=chunk)
        elif method == "naive":
            full_pol = gather_from_tensor_model_parallel_region(policy)
            full_ref = gather_from_tensor_model_parallel_region(ref)
            mixed = 0.5 * full_pol.float() + 0.5 * full_ref.float()
            logprobs = torch.log_softmax(mixed, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        else:
            logprobs = -vocab_parallel_cross_entropy(policy, labels_sb)
        logprobs.sum().backward()

    def fresh(method: str) -> torch.Tensor:
        policy = policy_base.view(seq, batch, v_local) if method == "mcore" else policy_base
        return policy.clone().requires_grad_()

    times: dict[str, list[float]] = {m: [] for m in methods}
    rss_before = None
    for rep in range(reps + 1):
        shift = rep % len(methods)
        for method in methods[shift:] + methods[:shift]:
            policy = fresh(method)
            if rss_before is None:  # once the inputs, this call's clone included, exist
                rss_before = psutil.Process().memory_info().rss
            dist.barrier()
            start = time.perf_counter()
            step(method, policy)
            dist.barrier()
            if rep:  # the first round is a warm-up
                times[method].append(time.perf_counter() - start)
            del policy
    peak_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    teardown()
    return {"times": times, "peak_extra_bytes": peak_extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=4, help="b of mcore's [s, b, V] (s = tokens / b)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument(
        "--mixed-chunks", type=int, nargs="*", default=[], help="also time mixed_logprobs with chunks of N logits"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.tokens % args.batch:
        parser.error("--tokens must be a multiple of --batch")

    results = []
    for tp in args.tp:
        threads = max(1, (os.cpu_count() or 1) // tp)
        kwargs = dict(tokens=args.tokens, vocab=args.vocab, batch=args.batch, threads=threads)
        methods = list(METHODS) + [f"mixed@{c}" for c in args.mixed_chunks]
        ranks = run_distributed(_worker, tp, methods=methods, reps=args.reps, **kwargs)
        for method in methods:
            # A repetition takes as long as its slowest rank.
            per_rep = [max(r["times"][method][i] for r in ranks) for i in range(args.reps)]
            mem = run_distributed(_worker, tp, methods=[method], reps=0, **kwargs)
            row = {
                "tp": tp,
                "method": method,
                "median_s": statistics.median(per_rep),
                "times": per_rep,
                "peak_extra_mib": max(r["peak_extra_bytes"] for r in mem) / 2**20,
            }
            results.append(row)
            print(json.dumps(row), flush=True)

    print(
        f"\n{args.tokens} tokens x {args.vocab} vocabulary, float32, median of {args.reps} alternating "
        f"repetitions, {os.cpu_count()} cores"
    )
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

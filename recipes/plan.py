"""Capacity planner: memory per GPU of a logit-averaging GRPO layout; exits 1 when it does not fit.

    python recipes/plan.py --model llama3-70b --tp 8 --pp 4 --dp 4 --micro-batch 1 --seq 4096 --recompute \
        --rollout-tp 8 --rollout-servers 4 --rollout-seqs 96 --rollout-context 4096

`--model` is a preset (llama3-8b, llama3-70b) or a Hugging Face directory. The launchers run it before
starting; the arithmetic is in nemo_logitavg/planning.py.
"""

from __future__ import annotations

import argparse
import sys

from nemo_logitavg.planning import GPUSpec, RolloutLayout, TrainingLayout, check, format_plan, plan, resolve_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="llama3-8b | llama3-70b | a Hugging Face directory")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, required=True, help="prompt + response tokens of a sequence")
    parser.add_argument("--recompute", action="store_true", help="full activation recomputation")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--rollout-tp", type=int, default=1, help="GPUs per inference server")
    parser.add_argument("--rollout-servers", type=int, default=1)
    parser.add_argument("--rollout-seqs", type=int, default=256, help="concurrent sequences a server caches")
    parser.add_argument("--rollout-context", type=int, default=None, help="max tokens a sequence (default --seq)")
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    parser.add_argument("--reserve-gib", type=float, default=6.0, help="CUDA context, NCCL, fragmentation")
    args = parser.parse_args(argv)

    try:
        result = plan(
            resolve_model(args.model),
            TrainingLayout(args.tp, args.pp, args.dp, args.micro_batch, args.seq, args.recompute,
                           args.sequence_parallel),
            RolloutLayout(args.rollout_tp, args.rollout_servers, args.rollout_seqs, args.rollout_context or args.seq),
            GPUSpec(args.gpu_gib, args.reserve_gib),
        )  # fmt: skip
        print(format_plan(result))
        check(result)
    except (ValueError, FileNotFoundError) as exc:
        print(f"plan: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Update-phase step time of logit-averaging GRPO against the KL-GRPO baseline, same config, same run.

    python -m tests.benchmarks.bench_grpo_vs_kl [--steps 6] [--hidden 256] [--layers 4] [--tp 2]

Runs recipes/grpo.py twice under torchrun on the same random models and prompts: logit averaging
(ref_weight 0.5, beta 0) and the baseline (ref_weight 0, beta 0.05, k3). Both run the reference forward; the
ratio is of the median `time/update_s` (the optimisation phase only: rollout is reported on its own, since
pi_mix decoding costs two models and KL-GRPO's one), steps after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.tiny_models import make_llama_with_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def run(tmp: Path, name: str, policy: str, reference: str, steps: int, tp: int, alg: dict) -> list[dict]:
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}*{b}=", "answer": str(a * b)}) + "\n"
                               for a in range(5) for b in range(5)))  # fmt: skip
    run_dir = tmp / name
    config = tmp / f"{name}.yaml"
    config.write_text(
        f"model: {{policy: {policy}, reference: {reference}, tensor_parallel: {tp}}}\n"
        f"algorithm: {json.dumps({'group_size': 8, **alg})}\n"
        f"rollout: {{prompts_per_step: 4, max_tokens: 32}}\n"
        f"train: {{micro_batch_size: 8}}\n"
        f"data: {{train: {prompts}}}\n"
        f"run: {{dir: {run_dir}, steps: {steps}, checkpoint_every: 1000, seed: 3}}\n"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    recipe = str(ROOT / "recipes" / "grpo.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp), "--master-addr",
           "127.0.0.1", "--master-port", str(port), recipe, "--config", str(config)]  # fmt: skip
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        policy = make_llama_with_tokenizer(str(tmp / "policy"), 1, 128, args.hidden, args.layers)
        reference = make_llama_with_tokenizer(str(tmp / "reference"), 2, 128, args.hidden, args.layers)
        results = {}
        for name, alg in (("logit-avg", {"ref_weight": 0.5, "beta": 0.0}),
                          ("kl-grpo", {"ref_weight": 0.0, "beta": 0.05})):  # fmt: skip
            metrics = run(tmp, name, policy, reference, args.steps, args.tp, alg)[1:]
            results[name] = {key: statistics.median(m[key] for m in metrics)
                             for key in ("time/update_s", "time/rollout_s", "time/old_logprobs_s")}  # fmt: skip
            print(json.dumps({name: results[name]}), flush=True)
    ratio = results["logit-avg"]["time/update_s"] / results["kl-grpo"]["time/update_s"]
    print(f"\nhidden {args.hidden}, {args.layers} layers, TP={args.tp}, 4 prompts x 8 completions x <=32 tokens, "
          f"median of steps 2..{args.steps}")  # fmt: skip
    print("| run | update (s) | old log-probs (s) | rollout (s) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['time/update_s']:.3f} | {r['time/old_logprobs_s']:.3f} | {r['time/rollout_s']:.3f} |")
    print(f"update-phase ratio logit-avg / kl-grpo: {ratio:.2f}x")


if __name__ == "__main__":
    main()

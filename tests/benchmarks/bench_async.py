"""Asynchronous GRPO (``algorithm.max_staleness = 1``) against the synchronous loop, trainer and server apart.

    python -m tests.benchmarks.bench_async [--steps 12] [--warmup 2] [--hidden 128] [--layers 4] [--prompts 4]
                                           [--group 4] [--max-tokens 24] [--trainer-cpu 0] [--server-cpu 1]

A tiny CPU GRPO setup (random tiny Llama policy and reference, the character tokenizer, arithmetic prompts):
``recipes/grpo.py`` at TP=1 in one process pinned to one core (``taskset -c``, one torch thread) against one
torch-engine rollout server pinned to another core (``--threads 1``), the cluster layout in miniature. The
same server serves both runs (each run is a new run id, so its steps start again from 0). Per run, the
medians over the steps after ``--warmup``:

- R: rollout + grading (``time/rollout_s + time/reward_s``) of the synchronous run;
- U: the trainer's part (``time/old_logprobs_s + time/update_s + time/weight_sync_s``) of the synchronous run;
- the loop's period (``time/step_s``) of each run, as steps per minute.

The ideal speed-up of the overlap is (R + U) / max(R, U); the target (DESIGN.md §7b) is at least 0.8 of it.
Choose the model and batch so that R and U are about equal (the defaults aim at that on an idle 2-core VM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_config(work: Path, args: argparse.Namespace, policy: str, reference: str, url: str, token: str,
                 staleness: int) -> Path:  # fmt: skip
    prompts = work / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                                   for a in range(10) for b in range(10)))  # fmt: skip
    run_dir = work / f"k{staleness}"
    config = work / f"grpo_k{staleness}.yaml"
    config.write_text(
        f"""model:
  policy: {policy}
  reference: {reference}
  tensor_parallel: 1
algorithm:
  ref_weight: 0.5
  group_size: {args.group}
  max_staleness: {staleness}
rollout:
  urls: ["{url}"]
  token: {token}
  prompts_per_step: {args.prompts}
  max_tokens: {args.max_tokens}
  micro_batch_size: {args.prompts * args.group}
data:
  train: {prompts}
optim:
  lr: 0.001
run:
  dir: {run_dir}
  steps: {args.steps}
  checkpoint_every: {args.steps}
  keep_last: 1
  seed: 3
"""
    )
    return config


def run_trainer(config: Path, cpu: int, log: Path) -> list[dict]:
    cmd = ["taskset", "-c", str(cpu), sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(ROOT / "recipes" / "grpo.py"),
           "--config", str(config)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with log.open("w") as out:
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=True, timeout=3600)
    run_dir = config.parent / config.stem.replace("grpo_", "")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    from nemo_logitavg.rollout.process import free_port

    return free_port()


def median(records: list[dict], *keys: str) -> float:
    return statistics.median(sum(r[k] for k in keys) for r in records)


def main() -> None:
    from nemo_logitavg.rollout.process import ServerProcess
    from tests.tiny_models import make_llama_with_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--trainer-cpu", type=int, default=0)
    parser.add_argument("--server-cpu", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        policy = make_llama_with_tokenizer(str(work / "policy"), 1, hidden_size=args.hidden,
                                           num_hidden_layers=args.layers)  # fmt: skip
        reference = make_llama_with_tokenizer(str(work / "reference"), 2, hidden_size=args.hidden,
                                              num_hidden_layers=args.layers)  # fmt: skip
        # The server inherits this process's CPU affinity (its torch threads included); then it is set back.
        everything = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {args.server_cpu})
        try:
            server = ServerProcess(policy, reference, 0.5, str(work / "server.log"),
                                   extra_args=["--threads", "1"])  # fmt: skip
        finally:
            os.sched_setaffinity(0, everything)
        try:
            server.wait_ready(600)
            results = {}
            for k in (0, 1):
                config = write_config(work, args, policy, reference, server.url, server.token, k)
                results[k] = run_trainer(config, args.trainer_cpu, work / f"trainer_k{k}.log")[args.warmup :]
        finally:
            server.stop()
    sync = results[0]
    R = median(sync, "time/rollout_s", "time/reward_s")
    U = median(sync, "time/old_logprobs_s", "time/update_s", "time/weight_sync_s")
    period = {k: median(r, "time/step_s") for k, r in results.items()}
    per_min = {k: 60.0 / p for k, p in period.items()}
    ideal = (R + U) / max(R, U)
    speedup = per_min[1] / per_min[0]
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")
    print(f"R (rollout + grading, sync) = {R:.3f} s   U (old + update + push, sync) = {U:.3f} s   "
          f"push alone = {median(sync, 'time/weight_sync_s'):.3f} s")  # fmt: skip
    print("| max_staleness | rollout + grading (s) | update + push (s) | step period (s) | steps/min | "
          "trainer waited (s) | servers waited (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for k, r in results.items():
        waited = median(r, "time/weights_wait_s") if "time/weights_wait_s" in r[0] else float("nan")
        rollout = median(r, "time/rollout_s", "time/reward_s")
        update = median(r, "time/old_logprobs_s", "time/update_s", "time/weight_sync_s")
        print(f"| {k} | {rollout:.3f} | {update:.3f} | {period[k]:.3f} | {per_min[k]:.2f} | "
              f"{median(r, 'time/rollout_wait_s'):.3f} | {waited:.3f} |")  # fmt: skip
    print(f"speed-up {speedup:.2f}x, ideal (R + U) / max(R, U) = {ideal:.2f}x, fraction of the ideal "
          f"{speedup / ideal:.2f} (target >= 0.8)")  # fmt: skip


if __name__ == "__main__":
    main()

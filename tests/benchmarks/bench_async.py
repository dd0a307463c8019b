"""Asynchronous GRPO (``algorithm.max_staleness = 1``) against the synchronous loop, trainer and server apart.

    python -m tests.benchmarks.bench_async [--rounds 3] [--steps 16] [--warmup 3] [--hidden 128] [--layers 4]
                                           [--prompts 12] [--group 4] [--max-tokens 16] [--trainer-cpu 0]
                                           [--server-cpu 1]

A tiny CPU GRPO setup (random tiny Llama policy and reference, the character tokenizer, arithmetic prompts):
``recipes/grpo.py`` at TP=1 in one process pinned to one core (``taskset -c``, one torch thread) against one
torch-engine rollout server pinned to another core (``--threads 1``), the cluster layout in miniature. The
same server serves both runs (each run is a new run id, so its steps start again from 0). Per run, the
medians over the steps after ``--warmup``. Each of ``--rounds`` rounds runs both settings, the order alternating
between rounds (the first run of a round meets a server warmed by the previous one); the ratios are per round,
and the summary is their median:

- R: rollout + grading (``time/rollout_s + time/reward_s``) of the synchronous run;
- U: the trainer's part (``time/old_logprobs_s + time/update_s + time/weight_sync_s``) of the synchronous run;
- the loop's period (``time/step_s``) of each run, as steps per minute.

The ideal speed-up of the overlap is (R + U) / max(R, U); the target (docs/design.md §7b) is at least 0.8 of it.
Besides, the overlapped run's period against its own bound max(R_1, U_1) (its own medians of the same two
parts): the part of the period the overlap does not hide (1.00 = nothing but the slower side).

Choose the model and batch so that R and U are about equal (the defaults gave R 0.32 s, U 0.34 s on the 2-core
VM, BENCHMARKS.md).
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
                 staleness: int, round_index: int) -> Path:  # fmt: skip
    prompts = work / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                                   for a in range(10) for b in range(10)))  # fmt: skip
    run_dir = work / f"r{round_index}_k{staleness}"
    config = work / f"grpo_r{round_index}_k{staleness}.yaml"
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
train:
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
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both settings, the order alternating")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
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
            rounds = []
            for i in range(args.rounds):
                results = {}
                for k in (0, 1) if i % 2 == 0 else (1, 0):
                    config = write_config(work, args, policy, reference, server.url, server.token, k, i)
                    results[k] = run_trainer(config, args.trainer_cpu, work / f"trainer_r{i}_k{k}.log")[args.warmup :]
                rounds.append(results)
        finally:
            server.stop()
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")
    print("| round | max_staleness | rollout + grading (s) | update + push (s) | step period (s) | steps/min | "
          "trainer waited (s) | servers waited (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    summary = []
    for i, results in enumerate(rounds):
        sync = results[0]
        R = median(sync, "time/rollout_s", "time/reward_s")
        U = median(sync, "time/old_logprobs_s", "time/update_s", "time/weight_sync_s")
        period = {k: median(r, "time/step_s") for k, r in results.items()}
        ideal = (R + U) / max(R, U)
        speedup = period[0] / period[1]
        async_bound = max(median(results[1], "time/rollout_s", "time/reward_s"),
                          median(results[1], "time/old_logprobs_s", "time/update_s", "time/weight_sync_s"))  # fmt: skip
        summary.append((R, U, speedup, ideal, period[1] / async_bound))
        for k in (0, 1):
            r = results[k]
            waited = median(r, "time/weights_wait_s") if "time/weights_wait_s" in r[0] else float("nan")
            rollout = median(r, "time/rollout_s", "time/reward_s")
            update = median(r, "time/old_logprobs_s", "time/update_s", "time/weight_sync_s")
            print(f"| {i} | {k} | {rollout:.3f} | {update:.3f} | {period[k]:.3f} | {60.0 / period[k]:.2f} | "
                  f"{median(r, 'time/rollout_wait_s'):.3f} | {waited:.3f} |")  # fmt: skip
    for i, (R, U, speedup, ideal, over_bound) in enumerate(summary):
        print(f"round {i}: R = {R:.3f} s, U = {U:.3f} s, speed-up {speedup:.2f}x, ideal {ideal:.2f}x, "
              f"fraction {speedup / ideal:.2f}, overlapped period / its own max(R, U) {over_bound:.2f}")  # fmt: skip
    speedup = statistics.median(row[2] for row in summary)
    ideal = statistics.median(row[3] for row in summary)
    fraction = statistics.median(row[2] / row[3] for row in summary)
    over_bound = statistics.median(row[4] for row in summary)
    print(f"median over rounds: speed-up {speedup:.2f}x, ideal (R + U) / max(R, U) = {ideal:.2f}x, fraction of the "
          f"ideal {fraction:.2f} (target >= 0.8); overlapped period / its own max(R, U) {over_bound:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()

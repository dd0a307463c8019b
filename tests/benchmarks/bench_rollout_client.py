"""Rollout throughput through the server: the client's chunked requests against one request per prompt.

    python -m tests.benchmarks.bench_rollout_client [--hidden 128] [--layers 4] [--vocab 256] [--reps 3]

A rollout server (torch engine, pi_mix of two random Llamas of the given shape, one torch thread) runs on
127.0.0.1 as a child process. Two workloads, each sent through ``RolloutClient.generate`` twice per
repetition, alternating: ``prompts_per_request=1`` (one request per prompt, the client before chunking: the
server decodes only a prompt's ``n`` samples together) and the default chunking (one request per server, at
most 64 prompts). Both give the same completions (per-prompt seeds), so the work is identical:

- grpo: 16 prompts x n=8 at temperature 1 (the main job's rollout batch),
- eval: 256 prompts x n=1, greedy (the main job's held-out evaluation).

Every completion runs to exactly ``max_tokens`` (``ignore_eos``). Throughput is generated tokens per second of
wall time in the client, median over ``reps``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from nemo_logitavg.rollout.client import RolloutClient
from nemo_logitavg.rollout.process import ServerProcess
from tests.benchmarks.bench_rollout import make_model

WORKLOADS = {"grpo": dict(prompts=16, n=8, temperature=1.0), "eval": dict(prompts=256, n=1, temperature=0.0)}


def run(client: RolloutClient, prompts: list[list[int]], n: int, temperature: float, max_tokens: int) -> float:
    start = time.perf_counter()
    groups = client.generate(prompts, n=n, max_tokens=max_tokens, temperature=temperature, seed=0, ignore_eos=True)
    elapsed = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for g in groups for c in g)
    assert tokens == len(prompts) * n * max_tokens
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        policy = make_model(f"{tmp}/policy", 1, args.hidden, args.layers, args.vocab)
        reference = make_model(f"{tmp}/reference", 2, args.hidden, args.layers, args.vocab)
        server = ServerProcess(
            policy, reference, 0.5, os.path.join(tmp, "server.log"),
            extra_args=["--threads", "1", "--max-tokens", str(args.max_tokens)],
        ).wait_ready()  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        results = []
        try:
            clients = {
                "per_prompt": RolloutClient(server.url, token=server.token, prompts_per_request=1),
                "chunked": RolloutClient(server.url, token=server.token),
            }
            for name, w in WORKLOADS.items():
                prompts = torch.randint(3, args.vocab, (w["prompts"], args.prompt_len), generator=gen).tolist()
                run(clients["chunked"], prompts[:2], 1, 1.0, 4)  # warm-up
                runs: dict[str, list[float]] = {k: [] for k in clients}
                for _ in range(args.reps):
                    for key, client in clients.items():
                        runs[key].append(run(client, prompts, w["n"], w["temperature"], args.max_tokens))
                chunked, per_prompt = statistics.median(runs["chunked"]), statistics.median(runs["per_prompt"])
                row = {
                    "workload": name,
                    **w,
                    "chunked_tok_s": round(chunked, 1),
                    "per_prompt_tok_s": round(per_prompt, 1),
                    "ratio": round(chunked / per_prompt, 2),
                    "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
                }
                results.append(row)
                print(json.dumps(row), flush=True)
            for client in clients.values():
                client.close()
        finally:
            server.stop()
    config = {k: getattr(args, k) for k in ("hidden", "layers", "vocab", "prompt_len", "max_tokens", "reps")}
    print(json.dumps({"config": config, "results": results}, indent=2))


if __name__ == "__main__":
    main()

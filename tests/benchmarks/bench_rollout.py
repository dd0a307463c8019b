"""Torch-engine decode throughput: pi_mix (policy + reference) against the same engine serving the policy alone.

    python -m tests.benchmarks.bench_rollout [--hidden 256] [--layers 4] [--vocab 8192] [--batch 1 16]
        [--prompt-len 16] [--max-tokens 64] [--reps 3] [--threads 1]

Two random Llamas of the given shape are written to a temporary directory. For each batch size, the pi_mix
engine (ref_weight 0.5, two models, two KV caches) and the policy-alone engine (ref_weight 0, no reference
model) generate ``batch`` sequences of exactly ``max_tokens`` tokens (``ignore_eos``) from ``prompt-len``-token
prompts; the engines alternate within each repetition so that machine noise hits both. Throughput is generated
tokens per second (the prefill included), the median over ``reps``; the ratio pi_mix / policy-alone has a
physical limit of 0.5 (two forward passes per token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from nemo_logitavg.rollout.engine import GenerationRequest, SamplingParams, TorchEngine


def make_model(path: str, seed: int, hidden: int, layers: int, vocab: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 8 * 8,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=2048,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def throughput(engine: TorchEngine, batch: int, prompt_len: int, max_tokens: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, engine.vocab_size, (batch, prompt_len), generator=gen).tolist()
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True)
    requests = [GenerationRequest(p, params, n=1, seed=seed + i) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    out = engine.generate(requests)
    elapsed = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for g in out for c in g)
    assert tokens == batch * max_tokens
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        policy = make_model(f"{tmp}/policy", 1, args.hidden, args.layers, args.vocab)
        reference = make_model(f"{tmp}/reference", 2, args.hidden, args.layers, args.vocab)
        engines = {"pi_mix": TorchEngine(policy, reference, 0.5), "policy_alone": TorchEngine(policy, None, 0.0)}
        for engine in engines.values():  # warm-up
            throughput(engine, 2, args.prompt_len, 4, 0)
        results = []
        for batch in args.batch:
            runs: dict[str, list[float]] = {name: [] for name in engines}
            for rep in range(args.reps):
                for name, engine in engines.items():
                    runs[name].append(throughput(engine, batch, args.prompt_len, args.max_tokens, 100 * rep))
            mix, alone = statistics.median(runs["pi_mix"]), statistics.median(runs["policy_alone"])
            row = {
                "batch": batch,
                "pi_mix_tok_s": round(mix, 1),
                "policy_alone_tok_s": round(alone, 1),
                "ratio": round(mix / alone, 3),
                "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    config = {k: getattr(args, k) for k in ("hidden", "layers", "vocab", "prompt_len", "max_tokens", "reps", "threads")}
    print(json.dumps({"config": config, "results": results}, indent=2))


if __name__ == "__main__":
    main()

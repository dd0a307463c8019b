"""With two or more GPUs: the actor at TP=2 over NCCL against TP=1 (the layouts' comparison of tests/test_actor.py,
on CUDA), and the collective push from a trainer on GPU 0 into a torch-engine server on GPU 1 over NCCL."""

from __future__ import annotations

import torch

from tests.gpu import GPU, TWO_GPUS, inner_timeout
from tests.tiny_models import make_hf_llama

pytestmark = [*GPU, TWO_GPUS]
# ~0.1B parameters: NCCL moves it in well under a second; the time goes to building, exporting and loading it.
SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
             num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512)  # fmt: skip


def test_tp2_over_nccl_matches_tp1(tmp_path):
    from tests.test_actor import rel, run_layout

    dirs = make_hf_llama(tmp_path / "policy", seed=1), make_hf_llama(tmp_path / "reference", seed=2)
    base = run_layout(1, 1, dirs, timeout_s=inner_timeout("multi_gpu") / 3)
    other = run_layout(2, 1, dirs, timeout_s=inner_timeout("multi_gpu") / 2)
    assert {t.device.type for r in (base, other) for t in r["logprobs"]} == {"cuda"}  # computed on the GPUs
    worst = max((a.cpu() - b.cpu()).abs().max().item()
                for a, b in zip(other["logprobs"], base["logprobs"], strict=True))  # fmt: skip
    grad_rel = max(rel(other["grads"][n].cpu(), g.cpu()) for n, g in base["grads"].items())
    print(f"[smoke] TP=2 over NCCL vs TP=1 on {torch.cuda.get_device_name(0)}: max|diff log pi_mix| {worst:.2e}, "
          f"max grad rel {grad_rel:.2e}")  # fmt: skip
    # float32 (no TF32 in matmuls by default): other reduction orders than TP=1, so 10x the CPU test's gloo bounds.
    assert worst < 1e-4 and grad_rel < 1e-4
    assert abs(other["grad_norm"] - base["grad_norm"]) / base["grad_norm"] < 1e-4


def test_push_over_nccl_into_a_server_on_another_gpu(tmp_path):
    from tests.distributed import run_distributed
    from tests.gpu.test_gpu_push import _push_worker

    limit = inner_timeout("multi_gpu")
    (result,) = run_distributed(_push_worker, world_size=1, timeout_s=limit, work=str(tmp_path), limit_s=limit,
                                server_device="cuda:1", shape=SHAPE)  # fmt: skip
    assert result["backend"] == "nccl"
    assert result["served"] == result["sample"]  # landed bit for bit
    times = ", ".join(f"{t:.2f}" for t in result["times"])
    print(f"[smoke] push of {result['params'] / 1e9:.2f}B bf16 params over NCCL, GPU 0 -> GPU 1: {times} s per step")

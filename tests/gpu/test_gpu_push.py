"""The collective push of a ~1B-parameter bfloat16 policy on one GPU: trainer rank and torch-engine server on the
same GPU, so the weight-update group is gloo through host memory (NCCL refuses two ranks on one GPU;
docs/design.md §7b). Prints the push time per step; checks the landed weights bit for bit on a sample of tensors."""

from __future__ import annotations

import os
import time

import httpx
import torch

from tests.distributed import run_distributed
from tests.gpu import GPU, inner_timeout

pytestmark = GPU
SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512)  # fmt: skip


def _push_worker(work: str, limit_s: float, server_device: str | None = None, shape: dict | None = None) -> dict:
    """Push 3 steps into a torch-engine server on ``server_device`` (default this rank's GPU: gloo)."""
    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.builder import build_gpt_model
    from nemo_logitavg.models.conversion.streaming import export_model_hf
    from nemo_logitavg.parallel import init_parallel, rank_device, teardown
    from nemo_logitavg.rollout.client import RolloutClient
    from nemo_logitavg.rollout.engine import tensor_digest
    from nemo_logitavg.rollout.process import ServerProcess
    from nemo_logitavg.trainer.weight_sender import PolicyPusher

    init_parallel()
    cfg = LlamaConfig(**(shape or SHAPE))
    torch.manual_seed(0)
    model = build_gpt_model(cfg, params_dtype=torch.bfloat16).to(rank_device())
    params = sum(p.numel() for p in model.parameters())
    start_dir = os.path.join(work, "start")
    export_model_hf(model, cfg, start_dir)
    device = server_device or str(rank_device())
    server = ServerProcess(start_dir, None, 0.0, os.path.join(work, "server.log"),
                           extra_args=["--device", device, "--dtype", "bfloat16"]).wait_ready(limit_s)
    try:
        client = RolloutClient([server.url], token=server.token, timeout=limit_s)
        pusher = PolicyPusher(model, cfg, client, push_timeout=limit_s)
        times = []
        for step in (1, 2, 3):
            with torch.no_grad():
                for i, p in enumerate(model.parameters()):  # new weights each step
                    p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 1000 + i))
                           .to(p.device, p.dtype))  # fmt: skip
            torch.cuda.synchronize()
            begin = time.perf_counter()
            confirmed = pusher.push(step)
            times.append(time.perf_counter() - begin)
            assert confirmed == [server.url]
        digests = httpx.get(server.url + "/v1/weights/digest", headers=server.auth_headers(), timeout=limit_s).json()
        from nemo_logitavg.models.conversion.streaming import iter_hf_buckets

        sample = {}
        for bucket in iter_hf_buckets(model, cfg, 1 << 30):
            for name, tensor in bucket:
                if name.endswith(("embed_tokens.weight", "layers.7.mlp.down_proj.weight", "norm.weight")):
                    sample[name] = tensor_digest(tensor)
        return {"params": params, "times": times, "backend": pusher._backend, "sample": sample,
                "served": {k: digests["policy"][k] for k in sample}}  # fmt: skip
    finally:
        server.stop()
        teardown()


def test_push_of_a_1b_policy_on_one_gpu(tmp_path):
    limit = inner_timeout("push")  # below smoke.sh's limit for the part (tests/gpu/limits.txt)
    (result,) = run_distributed(_push_worker, world_size=1, timeout_s=limit, work=str(tmp_path), limit_s=limit)
    assert result["params"] > 0.9e9 and result["backend"] == "gloo"
    assert result["served"] == result["sample"]  # landed bit for bit
    times = ", ".join(f"{t:.2f}" for t in result["times"])
    print(f"[smoke] push of {result['params'] / 1e9:.2f}B bf16 params over gloo on {torch.cuda.get_device_name(0)}: "
          f"{times} s per step")  # fmt: skip

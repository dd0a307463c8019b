"""The per-step policy push: the collective push against the filesystem path it replaced.

    python -m tests.benchmarks.bench_weight_push [--hidden 1536] [--layers 16] [--vocab 32000] [--reps 3]

A random Llama policy (float32, default ~0.55B parameters, no optimizer) on a trainer at TP=2 (two gloo
processes) and one torch-engine rollout server at ref_weight 0 (the policy alone) on 127.0.0.1. Each repetition
pushes the same weights both ways, alternating, and times one push end to end as the trainer sees it:

- collective: ``PolicyPusher.push`` (HF-named tensors gathered per tensor over TP, broadcast in buckets of
  ``--bucket-mb`` into the server's engine over a gloo weight-update group);
- filesystem (the baseline, the path the trainer took before; kept here only): ``dist.gather_object`` of every
  rank's state dict to rank 0, the whole model mapped to Hugging Face names, written as one safetensors
  directory, and the server reloading it with ``/v1/load_weights``.

Memory: the sending rank's (rank 0's) RSS growth during the push (the kernel's high-water mark, reset just
before, minus the RSS then). Figures: medians over ``--reps``; the server's weights are checked equal after each push.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from tests.memory import PeakRSS


def filesystem_push(model, cfg, client, out_dir: str, step: int) -> None:
    """The old per-step path: gather to rank 0, write one HF directory, the server reloads it (rank 0)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_logitavg.models.conversion.hf_files import export_hf
    from nemo_logitavg.models.conversion.mapping import mcore_to_hf_state_dict

    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    payload = (ps.get_tensor_model_parallel_rank(), state)
    received = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(payload, received, dst=0)
    if received is not None:
        grid = [[shard for _, shard in sorted(received, key=lambda r: r[0])]]
        export_hf(mcore_to_hf_state_dict(grid, cfg), out_dir, cfg)
        client.load_weights(out_dir, step)
    dist.barrier()


def _trainer(args: dict, work: str) -> dict:
    import torch.distributed as dist

    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.builder import build_gpt_model
    from nemo_logitavg.parallel import init_parallel, teardown
    from nemo_logitavg.rollout.client import RolloutClient
    from nemo_logitavg.rollout.process import ServerProcess
    from nemo_logitavg.trainer.weight_sender import PolicyPusher

    init_parallel(tensor_parallel_size=2)
    rank = dist.get_rank()
    cfg = LlamaConfig(
        vocab_size=args["vocab"], hidden_size=args["hidden"], intermediate_size=args["intermediate"],
        num_hidden_layers=args["layers"], num_attention_heads=args["heads"], num_key_value_heads=args["kv_heads"],
        max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_gpt_model(cfg, tensor_parallel_size=2)
    params = sum(p.numel() for p in model.parameters()) * 2  # both TP halves (embedding and head included)
    server, client = None, None
    initial = os.path.join(work, "initial")
    try:
        # The server starts from the model's own export (the old path, which also warms it up).
        filesystem_push(model, cfg, _NoServer(), initial, 0)
        if rank == 0:
            server = ServerProcess(initial, None, 0.0, os.path.join(work, "server.log"), weights_root=work,
                                   extra_args=["--threads", "1"]).wait_ready(600)  # fmt: skip
            client = RolloutClient([server.url], token=server.token, timeout=600)
        pusher = PolicyPusher(model, cfg, client, bucket_bytes=int(args["bucket_mb"] * 2**20), push_timeout=600)
        pusher.push(1)  # builds the group (a one-off), not timed
        times: dict[str, list[float]] = {"collective": [], "filesystem": []}
        growth: dict[str, list[int]] = {"collective": [], "filesystem": []}
        step = 1
        for rep in range(args["reps"]):
            for method in ("collective", "filesystem") if rep % 2 == 0 else ("filesystem", "collective"):
                step += 1
                dist.barrier()
                with PeakRSS() as rss:
                    start = time.perf_counter()
                    if method == "collective":
                        pusher.push(step)
                    else:
                        filesystem_push(model, cfg, client, os.path.join(work, f"sync_{step}"), step)
                    elapsed = time.perf_counter() - start
                times[method].append(elapsed)
                growth[method].append(rss.growth)
                if rank == 0:
                    print(f"rep {rep} {method}: {elapsed:.2f} s, rank-0 RSS +{rss.growth / 2**20:.0f} MiB", flush=True)
        largest = max(p.numel() * p.element_size() for p in model.parameters()) * 2
        return {"params": params, "times": times, "growth": growth, "largest_tensor_bytes": largest}
    finally:
        if server is not None:
            server.stop()
        teardown()


class _NoServer:
    def load_weights(self, path: str, step: int) -> None:  # the initial export has no server to reload yet
        return None


def main() -> None:
    from tests.distributed import run_distributed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bucket-mb", type=float, default=128.0)
    parser.add_argument("--reps", type=int, default=3)
    args = vars(parser.parse_args())
    # A fixed mmap threshold (inherited by the ranks): freed buffers go back to the OS, so the RSS growth is what a
    # push holds alive, not what glibc's heap happened to keep from the previous one.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    with tempfile.TemporaryDirectory() as work:
        result = run_distributed(_trainer, 2, timeout_s=3600, args=args, work=work)[0]
    med = {m: statistics.median(t) for m, t in result["times"].items()}
    mem = {m: statistics.median(g) for m, g in result["growth"].items()}
    bucket = int(args["bucket_mb"] * 2**20)
    print(json.dumps({
        "params": result["params"], "bucket_bytes": bucket, "largest_tensor_bytes": result["largest_tensor_bytes"],
        "push_s": result["times"], "rank0_rss_growth_bytes": result["growth"],
        "median_push_s": med, "median_rank0_rss_growth_mib": {m: g / 2**20 for m, g in mem.items()},
        "speedup": med["filesystem"] / med["collective"],
        "memory_ratio": mem["collective"] / max(mem["filesystem"], 1),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()

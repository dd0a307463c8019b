"""Run a function on several gloo processes (torchrun-style environment) and collect what each returns."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, kwargs: dict) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        result: Any = fn(**kwargs)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"rank{rank}.pt"))
        raise


def run_distributed(fn: Callable, world_size: int, timeout_s: float = 600.0, **kwargs: Any) -> list[Any]:
    """Spawn ``world_size`` processes running ``fn(**kwargs)``; return their results ordered by rank.

    ``fn`` must be importable (module level). A failure on any rank is raised here with that rank's
    traceback; processes still running after ``timeout_s`` (a hung collective) are killed.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry,
            args=(world_size, _free_port(), out_dir, fn, kwargs),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for proc in ctx.processes:
                        proc.kill()
                    raise TimeoutError(f"distributed test did not finish in {timeout_s:.0f} s")
        except Exception as exc:
            errors = []
            for rank in range(world_size):
                path = os.path.join(out_dir, f"rank{rank}.pt")
                if os.path.exists(path):
                    record = torch.load(path, weights_only=False)
                    if not record["ok"]:
                        errors.append(f"rank {rank}:\n{record['error']}")
            raise AssertionError("\n".join(errors) or str(exc)) from None
        results = []
        for rank in range(world_size):
            record = torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False)
            results.append(record["result"])
        return results


def gather_mcore_shards(module: torch.nn.Module, dst: int | None = 0) -> list[list[dict[str, torch.Tensor]]] | None:
    """Every model-parallel rank's ``module.state_dict()`` (data-parallel rank 0's, ``_extra_state`` dropped) as
    ``[pp_rank][tp_rank]``, gathered with plain torch.distributed on rank ``dst`` (every rank when None); other
    ranks get None. A collective over the default group; the whole state passes through the receiving ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    state = None
    if ps.get_data_parallel_rank() == 0:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    mine = (ps.get_data_parallel_rank(), ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    receives = dst is None or dist.get_rank() == dst
    everyone: list | None = [None] * dist.get_world_size() if receives else None
    if dst is None:
        dist.all_gather_object(everyone, (*mine, state))
    else:
        dist.gather_object((*mine, state), everyone, dst=dst)
    if everyone is None:
        return None
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    grid: list[list] = [[None] * tp for _ in range(pp)]
    for _, pp_rank, tp_rank, shard in everyone:
        if shard is not None:
            grid[pp_rank][tp_rank] = shard
    return grid

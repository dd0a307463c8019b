"""The parallel runtime: torch.distributed plus megatron-core's TP/PP/DP groups, from torchrun or srun.

    init_parallel(tensor_parallel_size=2)   # reads RANK/WORLD_SIZE/... (torchrun) or SLURM_* (srun)
    ...
    teardown()

The default group has one backend per device type: gloo for CPU tensors, and NCCL for CUDA tensors when CUDA is
present (the CPU compatibility patches are applied when it is not), so control messages on CPU tensors work on
any machine. ``rank_device()`` is the one place that says which device a rank computes on. ``wait_group()`` is
a CPU (gloo) group with its own, longer timeout, for the ranks that wait while rank 0 rolls out, grades and
pushes (docs/design.md §7b, Timeouts).
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_logitavg import cpu_compat

DEFAULT_MASTER_PORT = 29500
_WAIT_GROUP: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list ("node[01-04],gpu7" -> "node01"), via scontrol when present."""
    if shutil.which("scontrol"):
        # scontrol needs a readable slurm.conf; outside a configured cluster fall back to parsing.
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        hosts = result.stdout.split() if result.returncode == 0 else []
        if hosts:
            return hosts[0]
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.rstrip("]").split(",")[0].split("-")[0]
    return head


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank, world size and rendezvous address from torchrun's variables, else from srun's.

    With neither set, this is a single process (rank 0 of 1 on 127.0.0.1).

    Raises:
        ValueError: when only half of torchrun's RANK/WORLD_SIZE or srun's SLURM_PROCID/SLURM_NTASKS is set, or
            a variable does not parse; the message names the variable.
    """
    env = os.environ if environ is None else environ

    def as_int(name: str) -> int:
        try:
            return int(env[name])
        except ValueError:
            raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None

    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = as_int("RANK"), as_int("WORLD_SIZE")
        local_rank = as_int("LOCAL_RANK") if "LOCAL_RANK" in env else rank
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world_size = as_int("SLURM_PROCID"), as_int("SLURM_NTASKS")
        local_rank = as_int("SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    elif not any(name in env for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")):
        rank, world_size, local_rank = 0, 1, 0  # plain `python recipe.py`: one process
    else:
        raise ValueError(
            "incomplete launcher environment: torchrun sets RANK and WORLD_SIZE, srun sets SLURM_PROCID and "
            "SLURM_NTASKS; only part of one pair is set"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world size {world_size}")

    if "MASTER_ADDR" in env:
        master_addr = env["MASTER_ADDR"]
    elif "SLURM_JOB_NODELIST" in env:
        master_addr = _first_slurm_host(env["SLURM_JOB_NODELIST"])
    elif world_size == 1:
        master_addr = "127.0.0.1"
    else:
        raise ValueError("MASTER_ADDR is not set (and no SLURM_JOB_NODELIST to derive it from)")
    if "MASTER_PORT" in env:
        master_port = as_int("MASTER_PORT")
    elif "SLURM_JOB_ID" in env:
        # Jobs sharing a node must not share a port.
        master_port = 20000 + as_int("SLURM_JOB_ID") % 20000
    else:
        master_port = DEFAULT_MASTER_PORT
    return LaunchEnv(rank, world_size, local_rank, master_addr, master_port)


def rank_device(environ: Mapping[str, str] | None = None) -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK % device_count`` when CUDA is present, else the CPU.

    ``LOCAL_RANK`` is read as ``launch_env`` reads it (torchrun's, else srun's ``SLURM_LOCALID``).
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", launch_env(environ).local_rank % torch.cuda.device_count())


def default_backend() -> str:
    """gloo for CPU tensors and, with CUDA, NCCL for CUDA tensors: the default group takes both."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def wait_group() -> dist.ProcessGroup:
    """The CPU (gloo) group of all ranks with ``init_parallel``'s ``wait_timeout_s``, for CPU tensors and objects.

    Raises:
        RuntimeError: before ``init_parallel`` (or after ``teardown``).
    """
    if _WAIT_GROUP is None:
        raise RuntimeError("wait_group() needs init_parallel() first")
    return _WAIT_GROUP


def init_parallel(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    seed: int = 1234,
    backend: str | None = None,
    timeout_minutes: int = 30,
    environ: Mapping[str, str] | None = None,
    wait_timeout_s: float | None = None,
) -> LaunchEnv:
    """Initialise torch.distributed and megatron-core's parallel state; data parallel is what remains.

    Args:
        tensor_parallel_size: ranks a layer (and the vocabulary) is split over.
        pipeline_parallel_size: stages the layers are split into.
        seed: megatron-core's model-parallel RNG seed (TP ranks get distinct dropout streams).
        backend: a torch.distributed backend string; by default ``default_backend()`` (gloo for CPU tensors,
            plus NCCL for CUDA tensors when CUDA is present).
        timeout_minutes: collective timeout.
        environ: the launcher's environment; ``os.environ`` by default.
        wait_timeout_s: the timeout (seconds) of ``wait_group()``, the gloo group of all ranks on which ranks
            wait for rank 0's rollout, grading and push; by default ``timeout_minutes``.

    Raises:
        ValueError: when the world size is not a multiple of ``tensor_parallel_size * pipeline_parallel_size``,
            or the launcher environment is incomplete.
    """
    for name, size in (
        ("tensor_parallel_size", tensor_parallel_size),
        ("pipeline_parallel_size", pipeline_parallel_size),
    ):
        if int(size) < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    env = launch_env(environ)
    model_parallel = tensor_parallel_size * pipeline_parallel_size
    if env.world_size % model_parallel:
        raise ValueError(
            f"world size {env.world_size} is not a multiple of tensor_parallel_size x pipeline_parallel_size "
            f"= {tensor_parallel_size} x {pipeline_parallel_size}"
        )
    if wait_timeout_s is not None and not wait_timeout_s > 0:
        raise ValueError(f"wait_timeout_s must be > 0, got {wait_timeout_s}")
    backend = backend or default_backend()
    device = rank_device(environ)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        cpu_compat.apply()

    # After cpu_compat.apply(), whose warning filters silence megatron's import warnings on CPU; heavy too (~3 s).
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)
    global _WAIT_GROUP
    wait_s = 60.0 * timeout_minutes if wait_timeout_s is None else float(wait_timeout_s)
    _WAIT_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait_s))
    return env


def teardown() -> None:
    """Destroy megatron-core's groups and the default process group; safe to call twice."""
    # megatron-core is heavy (~3 s): models and the job import this module without it (see init_parallel)
    from megatron.core import parallel_state

    global _WAIT_GROUP
    parallel_state.destroy_model_parallel()
    _WAIT_GROUP = None  # destroyed with the default group below
    if dist.is_initialized():
        dist.destroy_process_group()

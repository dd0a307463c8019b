"""Make megatron-core's models, RNG tracker and schedules run on a CPU-only torch build.

megatron-core assumes CUDA in a handful of places (measured with 0.16.1, docs/design.md §5):
``GlobalMemoryBuffer.get_tensor`` allocates on ``torch.cuda.current_device()``; the model-parallel RNG
tracker saves and restores CUDA generator states; ``torch.cuda.current_device()`` is passed as a device and
``torch.cuda.synchronize()`` is called by the p2p code; tied embeddings at PP > 1 call ``.cuda()``; and the
pipeline schedules, the default causal mask, the optimiser, gradient clipping and a few buffers use a hard-coded
``device="cuda"``.
``apply()`` redirects each of these to the CPU. When CUDA is available it does nothing, so the same code runs
unchanged on GPUs.
"""

from __future__ import annotations

import importlib
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_applied = False
_CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.exchange_utils",
)


def _cpu_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.set_rng_state(new_state)


class _CpuDeviceTorch(types.ModuleType):
    """``torch`` as seen by the pipeline schedules, with ``device="cuda"`` in factory calls mapped to CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in {"zeros", "ones", "empty", "full", "tensor", "empty_like", "zeros_like"}:

            def factory(*args: Any, **kwargs: Any) -> torch.Tensor:
                if str(kwargs.get("device", "")).startswith("cuda"):
                    kwargs["device"] = "cpu"
                return attr(*args, **kwargs)

            return factory
        return attr


def apply() -> bool:
    """Patch megatron-core for CPU execution when CUDA is absent; idempotent.

    Returns:
        True when the CPU patches are in force, False when CUDA is available (nothing was changed).
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    # Expected on a CPU machine, printed once per import site: keep the console readable.
    for message in (
        "Transformer Engine and Apex are not installed",
        "Apex is not installed",
        "full scope is deprecated",
        "When using async grad allreduce",  # CUDA_DEVICE_MAX_CONNECTIONS: a GPU-only tuning hint
    ):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)

    # After the filters above (megatron warns on import) and only on CPU: megatron-core is heavy (~3 s).
    from megatron.core import utils as mcore_utils
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = lambda: torch.device("cpu")  # used as `device=` throughout megatron
    torch.cuda.synchronize = lambda *_args, **_kwargs: None
    # On a CPU-only build `.cuda()` can only raise; megatron calls it on tied embeddings at PP > 1.
    torch.Tensor.cuda = lambda self, *_args, **_kwargs: self

    def get_tensor(self: Any, tensor_shape: Any, dtype: torch.dtype, name: str, mem_alloc_context: Any = None):
        numel = 1
        for dim in tensor_shape:
            numel *= dim
        key = (name, dtype)
        if key not in self.buffer or self.buffer[key].numel() < numel:
            self.buffer[key] = torch.empty(numel, dtype=dtype, device="cpu", requires_grad=False)
        return self.buffer[key][0:numel].view(*tensor_shape)

    mcore_utils.GlobalMemoryBuffer.get_tensor = get_tensor

    # The tracker keeps named generator states and swaps them in and out around TP-local work (dropout,
    # initialisation); the CPU default generator plays the CUDA generator's part.
    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state

    def add(self: Any, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        with _preserved_cpu_rng():
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()

    mcore_random.CudaRNGStatesTracker.add = add

    # Gradient clipping asserts `grad.type() == "torch.cuda.FloatTensor"`; the same scaling without it.
    # megatron-core, imported after the warning filters like the imports above
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        params = [parameters] if isinstance(parameters, torch.Tensor) else parameters
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for param in params:
                grad = getattr(param, attr, None)
                if grad is not None:
                    grad.detach().mul_(clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    mcore_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    # Hard-coded device="cuda": the schedules' token counter, the default causal attention mask, the optimiser's
    # scale and overflow buffers, gradient clipping, the DDP buffer warm-up and checkpoint exchange buffers.
    for module in _CUDA_FACTORY_MODULES:
        importlib.import_module(module).torch = _CpuDeviceTorch()
    _applied = True
    return True


@contextmanager
def _preserved_cpu_rng() -> Iterator[None]:
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)

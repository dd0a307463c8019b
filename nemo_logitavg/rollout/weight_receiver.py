"""The servers' side of the collective policy push (docs/design.md §2, §7b): ``WeightReceiver`` joins a push's
weight-update groups and lands its buckets. The torch engine uses it whole (its weights live in the server's
process); each vLLM worker joins with it and receives with ``weight_wire.receive_buckets`` into vLLM's own loader
(``vllm_model.PolicyWeightsExtension``). The sender is ``nemo_logitavg.trainer.weight_sender``; both speak
``weight_wire``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from nemo_logitavg.rollout.weight_wire import BucketPlan, GroupSpec, open_group, receive_buckets


class WeightReceiver:
    """A server's side of the push, for engines whose weights live in this process (the torch engine).

    ``join`` opens one group per stage (in background threads, so the HTTP request returns at once);
    ``receive`` lands every stage's buckets and hands each to ``load_bucket``. The vLLM engine runs the same
    functions (``open_group``, ``receive_buckets``) inside its workers.
    """

    def __init__(self) -> None:
        self._groups: dict[int, dist.ProcessGroup] = {}
        self._joining: list[threading.Thread] = []
        self._join_errors: list[str] = []
        self.backends: dict[int, str] = {}

    def join(self, specs: Sequence[GroupSpec], rank: int) -> None:
        """Start joining each stage's group as ``rank``; returns at once (``joined`` waits and reports errors)."""
        self._groups, self._join_errors = {}, []
        self.backends = {s.stage: s.backend for s in specs}

        def one(spec: GroupSpec) -> None:
            try:
                self._groups[spec.stage] = open_group(spec, rank)
            except Exception as exc:  # noqa: BLE001 - reported by the next update
                self._join_errors.append(f"stage {spec.stage}: {type(exc).__name__}: {exc}")

        self._joining = [threading.Thread(target=one, args=(s,), daemon=True) for s in specs]
        for thread in self._joining:
            thread.start()

    def joined(self, plans: dict[int, BucketPlan], timeout_s: float) -> dict[int, dist.ProcessGroup]:
        """The groups, once joined (waits up to ``timeout_s``), checked against the stages of ``plans``."""
        deadline = time.monotonic() + timeout_s
        for thread in self._joining:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._join_errors or any(t.is_alive() for t in self._joining):
            raise RuntimeError(f"weight-update groups not joined: {'; '.join(self._join_errors) or 'timed out'}")
        if set(plans) != set(self._groups):
            raise RuntimeError(f"the push plan names stages {sorted(plans)}, the groups are {sorted(self._groups)}")
        return self._groups

    def receive(
        self,
        plans: dict[int, BucketPlan],
        dtype: torch.dtype,
        load_bucket: Callable[[list[tuple[str, torch.Tensor]]], None],
        timeout_s: float,
        device: torch.device | str = "cpu",
        into: Callable[[str, tuple[int, ...]], torch.Tensor | None] | None = None,
    ) -> int:
        """Receive every stage's buckets (stages in parallel) into ``load_bucket``; returns the tensors loaded.

        ``load_bucket`` gets one bucket at a time as ``(Hugging Face name, tensor)`` pairs, each tensor of the
        plan's full shape, dtype ``dtype``, on ``device`` (``into``: as in ``weight_wire.receive_buckets``).

        Raises:
            RuntimeError: the groups were not joined, a stage failed, or the push did not finish in time.
        """
        deadline = time.monotonic() + timeout_s
        self.joined(plans, timeout_s)
        lock, loaded, errors = threading.Lock(), [0], []

        def stage(s: int) -> None:
            try:
                for bucket in receive_buckets(self._groups[s], plans[s], dtype, device, into):
                    with lock:  # buckets of different stages land in the engine one at a time
                        load_bucket(bucket)
                        loaded[0] += len(bucket)
            except Exception as exc:  # noqa: BLE001 - raised below for the whole push
                errors.append(f"stage {s}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=stage, args=(s,), daemon=True) for s in sorted(plans)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise RuntimeError(f"the push did not finish within {timeout_s:.0f} s")
        if errors:
            raise RuntimeError("; ".join(errors))
        return loaded[0]

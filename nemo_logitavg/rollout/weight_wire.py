"""The wire format of the collective policy push, shared by both ends (docs/design.md §2, §7b).

The sender (``nemo_logitavg.trainer.weight_sender.PolicyPusher``, beside the trainer) and the receivers
(``weight_receiver.WeightReceiver`` in the torch engine's server, ``vllm_model.PolicyWeightsExtension`` in vLLM's
workers) agree on everything here, and on nothing else: this module imports neither megatron nor the trainer.

Groups. One per pipeline stage. Rank 0 of a stage's group is that stage's sender (its TP-rank-0 of
DP-rank-0); ranks 1.. are the receivers, in member order (one per server for the torch engine, one per TP
worker for vLLM). A group is built from its own ``TCPStore``, hosted by its sender, never from the trainer's
default group: a server joining or dying never touches the trainer's own collectives. Backend: NCCL when the
sender and every receiver have CUDA and no receiver sits on the sender's GPU (NCCL refuses two ranks on one
GPU), gloo otherwise (through host memory). ``GroupSpec`` is what a member needs to join; ``open_group`` joins.

What moves. The plan of stage ``s`` (``BucketPlan``: buckets of ``(Hugging Face name, full shape)``) is
``hf_bucket_plan(cfg, s, pp, bucket_bytes, dtype)`` on the sender; it travels as JSON (``plan_to_wire`` /
``plan_from_wire``) with the dtype's name (``dtype_name`` / ``parse_dtype``). Both sides know every tensor's name
and shape before it moves, so a bucket is a run of broadcasts from rank 0 (``send_buckets``) into tensors the
receiver allocated (``receive_buckets``), and no process ever holds more than a bucket (plus one in flight)
beyond its model. ``policy_manifest`` digests the ``(name, shape)`` pairs: a server advertises it in
``/v1/models`` and the sender pushes only to servers whose manifest equals its own.

The steps of a push (probe, rebuild the groups when members changed, post ``/v1/weights/update`` and
broadcast) are described in ``nemo_logitavg.trainer.weight_sender``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

BucketPlan = list[list[tuple[str, tuple[int, ...]]]]  # buckets of (Hugging Face name, full shape)

# Default bucket sizes: NeMo-RL packs ~2% of GPU memory per buffer; on CPUs a smaller bucket keeps the sender's
# extra RSS low without many more collective calls.
DEFAULT_BUCKET_BYTES = {"cuda": 1 << 30, "cpu": 128 << 20}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype``: ``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """The dtype a wire name stands for (``float32``, ``bfloat16`` or ``float16``).

    Raises:
        ValueError: any other name.
    """
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def policy_manifest(shapes: Iterable[tuple[str, Sequence[int]]]) -> str:
    """A digest of ``(name, shape)`` pairs in any order: two sides agree on it iff they move the same tensors."""
    text = json.dumps(sorted((name, list(shape)) for name, shape in shapes))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def local_address_toward(host: str) -> str:
    """This machine's address on the route to ``host`` (127.0.0.1 for loopback): what a peer can connect to."""
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # UDP connect sends nothing; it only picks the route
        return probe.getsockname()[0]


@dataclass(frozen=True)
class GroupSpec:
    """One stage's weight-update group, as its members need it to join."""

    stage: int
    host: str  # the sender's address (it hosts the group's TCPStore)
    port: int
    world_size: int
    backend: str  # gloo | nccl
    name: str  # unique per build: stores and groups of an older build never mix with a new one
    timeout_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupSpec:
        try:
            spec = cls(
                stage=int(data["stage"]), host=str(data["host"]), port=int(data["port"]),
                world_size=int(data["world_size"]), backend=str(data["backend"]), name=str(data["name"]),
                timeout_s=float(data["timeout_s"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed weight-update group spec {data!r}: {exc}") from None
        if spec.backend not in ("gloo", "nccl"):
            raise ValueError(f"weight-update group backend must be gloo or nccl, got {spec.backend!r}")
        if spec.world_size < 2 or not 0 < spec.port < 65536 or spec.timeout_s <= 0:
            raise ValueError(f"weight-update group spec out of range: {data!r}")
        return spec


def open_group(spec: GroupSpec, rank: int, store: dist.TCPStore | None = None) -> dist.ProcessGroup:
    """Join ``spec``'s group as ``rank`` (blocks until every member joined or the timeout passes).

    The sender passes the store it hosts; a receiver connects to ``spec.host:spec.port``.
    """
    timeout = datetime.timedelta(seconds=spec.timeout_s)
    if store is None:
        store = dist.TCPStore(spec.host, spec.port, spec.world_size, is_master=False, timeout=timeout)
    prefixed = dist.PrefixStore(spec.name, store)
    if spec.backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, spec.world_size, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address_toward(spec.host))]
    return dist.ProcessGroupGloo(prefixed, rank, spec.world_size, options)


class PushAborted(RuntimeError):
    """A push's collectives did not complete by their deadline; its weight-update group was aborted.

    A ``RuntimeError``, as the broken-group errors gloo and NCCL raise: the sender's existing failure path (the
    server is stale, the group is rebuilt at the next push) handles it unchanged.
    """


# How often the host checks a collective in flight: short against any deadline, long against a syscall.
POLL_S = 0.01


def _issue_broadcast(group: dist.ProcessGroup, tensor: torch.Tensor) -> dist.Work:
    """Start one broadcast from rank 0 of ``group``, asynchronously (the one place a push issues a collective)."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    return group.broadcast([tensor], options)


def abort_group(group: dist.ProcessGroup) -> None:
    """Abort ``group`` (a weight-update group only: never one of the trainer's).

    The groups of ``open_group`` are backend objects built from their own store and never registered with
    ``torch.distributed`` (so ``dist.destroy_process_group`` and ``distributed_c10d._abort_process_group``, which
    look the group up in the registry, do not apply): ``ProcessGroup.abort`` ends this group's communicator and
    work in flight (NCCL: ``ncclCommAbort``) and touches no other group.
    """
    try:
        group.abort()
    except RuntimeError as exc:  # a backend without abort (or one already torn down): nothing more to end
        print(f"[push] aborting the weight-update group: {exc}", flush=True)


def complete_works(
    group: dist.ProcessGroup, works: Sequence[dist.Work], deadline: float | None, poll_s: float = POLL_S
) -> None:
    """Wait for ``works`` (collectives on ``group``) on the host, giving up at ``deadline`` (``time.monotonic``).

    Why polling: on NCCL ``work.wait()`` only makes the current CUDA stream wait for the collective and returns
    at once; nothing blocks or raises on the host. A receiver that died (or never came) then leaves the stream
    waiting until the NCCL watchdog kills the whole process (``TORCH_NCCL_ASYNC_ERROR_HANDLING``). So the host
    polls ``work.is_completed()`` (true only once the collective finished on the device, or failed) and nothing
    counts as sent before every work is completed; at the deadline this group alone is aborted and
    ``PushAborted`` raised. On gloo the same loop applies (``is_completed`` follows the host-side work); a
    completed work's ``wait()`` then raises gloo's own error when the collective failed. ``deadline=None``:
    plain ``wait()`` (the group's own timeout applies).

    Raises:
        PushAborted: the deadline passed before every work completed (the group is aborted).
        RuntimeError: a collective failed (the backend's error).
    """
    if deadline is not None:
        pending = list(works)
        while pending:
            pending = [work for work in pending if not work.is_completed()]
            if not pending:
                break
            if time.monotonic() >= deadline:
                abort_group(group)
                raise PushAborted(
                    f"{len(pending)} of {len(works)} broadcasts of the weight-update group not completed by the "
                    "push deadline: the group is aborted"
                )
            time.sleep(poll_s)
    for work in works:
        work.wait()  # completed: raises the backend's error if the collective failed; NCCL: orders the stream


def _broadcast_all(group: dist.ProcessGroup, tensors: Sequence[torch.Tensor], deadline: float | None = None) -> None:
    """Broadcast every tensor from rank 0 of ``group`` in place (any shape and dtype), all in flight at once;
    completed (or given up, the group aborted) by ``deadline`` (``complete_works``)."""
    works = [_issue_broadcast(group, t) for t in tensors]
    complete_works(group, works, deadline)


def send_buckets(
    group: dist.ProcessGroup,
    buckets: Iterable[list[tuple[str, torch.Tensor]]],
    plan: BucketPlan,
    backend: str,
    deadline: float | None = None,
) -> int:
    """Broadcast ``buckets`` (the sender's ``iter_hf_buckets``) as rank 0 of ``group``; returns the bytes sent.

    Bucket ``k`` is a list of ``(name, tensor)`` with exactly the names and full shapes of ``plan[k]``, in the
    policy's dtype (the one the update request names), on any device: over gloo each tensor is copied to the host
    first, over NCCL it is sent from where it lives (contiguous).

    ``deadline`` (``time.monotonic``, the whole push): every broadcast completes on the host by then, or the group
    is aborted (``complete_works``).

    Raises:
        RuntimeError: the buckets do not follow ``plan`` (the receivers would mis-assign tensors).
        PushAborted: the deadline passed (a ``RuntimeError``).
    """
    sent, count = 0, 0
    # No enumerate(): its cached result tuple would keep the previous bucket alive while the next is built.
    for bucket in buckets:
        k = count
        if k >= len(plan) or [name for name, _ in bucket] != [name for name, _ in plan[k]]:
            raise RuntimeError(f"bucket {k} of the policy does not follow the push plan")
        for (name, tensor), (_, shape) in zip(bucket, plan[k], strict=True):
            if tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{name} has shape {tuple(tensor.shape)}, the push plan says {tuple(shape)}")
        del tensor
        # gloo moves host memory: stage CUDA tensors on the host (the one-GPU case); NCCL sends them in place.
        staged = [t.detach().contiguous() if backend == "nccl" else t.detach().cpu().contiguous() for _, t in bucket]
        _broadcast_all(group, staged, deadline)
        sent += sum(t.numel() * t.element_size() for t in staged)
        count += 1
        del bucket, staged  # before the iterator builds the next one: one bucket alive at a time
    if count != len(plan):
        raise RuntimeError(f"the policy yielded {count} buckets, the push plan has {len(plan)}")
    return sent


def receive_buckets(
    group: dist.ProcessGroup,
    plan: BucketPlan,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    into: Callable[[str, tuple[int, ...]], torch.Tensor | None] | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The receiving side of ``send_buckets``: yields each bucket as ``(name, tensor)`` once it has landed.

    Tensor ``name`` of a bucket has the plan's ``shape``, dtype ``dtype`` and lives on ``device`` (the host for
    gloo; the receiver's GPU for NCCL). ``into(name, shape)`` may give the tensor to receive into (the served
    weight itself, when its dtype, device and layout allow: no copy); otherwise a fresh one is allocated.
    """
    for bucket in plan:
        tensors = []
        for name, shape in bucket:
            target = into(name, tuple(shape)) if into is not None else None
            ok = target is not None and target.dtype == dtype and target.is_contiguous()
            ok = ok and target.device == torch.device(device) and tuple(target.shape) == tuple(shape)
            tensors.append(target if ok else torch.empty(tuple(shape), dtype=dtype, device=device))
        _broadcast_all(group, tensors)
        yield [(name, t) for (name, _), t in zip(bucket, tensors, strict=True)]


def plan_to_wire(plans: dict[int, BucketPlan]) -> dict[str, list]:
    """The plans as JSON: ``{"stage": [[[name, shape], ...], ...]}``."""
    return {str(s): [[[name, list(shape)] for name, shape in bucket] for bucket in plan] for s, plan in plans.items()}


def plan_from_wire(data: Any) -> dict[int, BucketPlan]:
    """Parse and check the ``plan`` of an update request (``{"stage": [[[name, shape], ...], ...]}``)."""
    if not isinstance(data, dict) or not data:
        raise ValueError("plan must be a non-empty mapping of stage -> buckets")
    plans: dict[int, BucketPlan] = {}
    for stage, buckets in data.items():
        if not str(stage).isdigit() or not isinstance(buckets, list):
            raise ValueError(f"plan stage {stage!r} must be a stage number with a list of buckets")
        parsed = []
        for bucket in buckets:
            if not isinstance(bucket, list) or not bucket:
                raise ValueError(f"plan stage {stage}: a bucket must be a non-empty list of [name, shape]")
            entries = []
            for entry in bucket:
                ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                ok = ok and isinstance(entry[1], list) and all(isinstance(d, int) and d >= 0 for d in entry[1])
                if not ok:
                    raise ValueError(f"plan stage {stage}: malformed entry {str(entry)[:80]}")
                entries.append((entry[0], tuple(entry[1])))
            parsed.append(entries)
        plans[int(stage)] = parsed
    return plans

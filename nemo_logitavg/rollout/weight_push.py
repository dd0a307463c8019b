"""The collective policy push: the trainer streams Hugging Face-named policy tensors, bucket by bucket, straight
into every rollout server's engine over weight-update process groups of their own (DESIGN.md §2, §7b).

Groups. One per pipeline stage. Rank 0 of a stage's group is that stage's sender (its TP-rank-0 of
DP-rank-0); ranks 1.. are the receivers, in member order (one per server for the torch engine, one per TP
worker for vLLM). A group is built from its own ``TCPStore``, hosted by its sender, never from the trainer's
default group: a server joining or dying never touches the trainer's own collectives. Backend: NCCL when the
sender and every receiver have CUDA and no receiver sits on the sender's GPU (NCCL refuses two ranks on one
GPU), gloo otherwise (through host memory).

What moves. The plan of stage ``s`` is ``hf_bucket_plan(cfg, s, pp, bucket_bytes, dtype)``: both sides know
every tensor's name and shape before it moves, so a bucket is a run of broadcasts from rank 0 into tensors the
receiver allocated, and no process ever holds more than a bucket (plus one in flight) beyond its model.

A push of step K (``PolicyPusher.push``, a collective over the trainer's ranks):

1. rank 0 probes every server (``GET /v1/models``: ``server_id``, ``policy_manifest``, ``weight_receivers``,
   ``device``); members are the servers that answer and serve a policy of the trainer's shape;
2. when the members changed (a server is new, restarted with a new ``server_id``, or gone) every sender
   rebuilds its group: it hosts a fresh store, rank 0 posts ``/v1/weights/join`` to each member, and all
   construct the group;
3. rank 0 posts ``/v1/weights/update`` (step, run id, the plan) to every member in background threads; each
   answers only once it has received every bucket and loaded it; meanwhile the senders broadcast. A server
   that does not confirm is stale: the client sends it no rollouts until a later push lands, and the group is
   rebuilt at the next push.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
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


def _broadcast_all(group: dist.ProcessGroup, tensors: Sequence[torch.Tensor]) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    works = [group.broadcast([t], options) for t in tensors]
    for work in works:
        work.wait()


def send_buckets(
    group: dist.ProcessGroup, buckets: Iterable[list[tuple[str, torch.Tensor]]], plan: BucketPlan, backend: str
) -> int:
    """Broadcast ``buckets`` (the sender's ``iter_hf_buckets``) as rank 0 of ``group``; returns the bytes sent.

    Raises:
        RuntimeError: the buckets do not follow ``plan`` (the receivers would mis-assign tensors).
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
        _broadcast_all(group, staged)
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

    ``into(name, shape)`` may give the tensor to receive into (the served weight itself, when its dtype, device
    and layout allow: no copy); otherwise a fresh one is allocated.
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


def new_build_name() -> str:
    return f"nemo_logitavg_push_{uuid.uuid4().hex[:12]}"


# ------------------------------------------------------------------------------------------- trainer side


@dataclass
class _Member:
    url: str
    server_id: str
    receivers: int
    device: dict


class PolicyPusher:
    """The trainer's side of the push: every rank constructs one and calls ``push(step)`` together.

    Args:
        model: this rank's policy chunk (``GPTModel``, DDP-wrapped or not).
        cfg: the policy's ``LlamaConfig``.
        client: the ``RolloutClient`` on global rank 0 (None elsewhere); its URLs are the candidate servers.
        bucket_bytes: the most bytes one bucket holds (None: ``DEFAULT_BUCKET_BYTES`` for the model's device).
        push_timeout: seconds a push (and a group build) may take before it counts as failed.
        control_group: a CPU (gloo) group over every trainer rank for the small control messages (None: the
            default group, which must then carry CPU tensors).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: Any,
        client: Any,
        bucket_bytes: int | None = None,
        push_timeout: float = 600.0,
        control_group: dist.ProcessGroup | None = None,
    ) -> None:
        from megatron.core import parallel_state as ps

        from nemo_logitavg.models.conversion.mapping import hf_bucket_plan

        self.model, self.cfg, self.client = model, cfg, client
        self.rank = dist.get_rank()
        self.control_group = control_group
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.bucket_bytes = int(bucket_bytes or DEFAULT_BUCKET_BYTES["cuda" if param.is_cuda else "cpu"])
        self.push_timeout = float(push_timeout)
        self.stage, self.stages = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
        replica0 = ps.get_data_parallel_rank() == 0
        self.streams = replica0  # every TP rank of DP replica 0 takes part in gathering its stage's tensors
        self.is_sender = replica0 and ps.get_tensor_model_parallel_rank() == 0
        self.plans = {s: hf_bucket_plan(cfg, s, self.stages, self.bucket_bytes, self.dtype) for s in range(self.stages)}
        self.manifest = policy_manifest(
            entry for plan in self.plans.values() for bucket in plan for entry in bucket
        )
        self.members: list[_Member] = []
        self._store: dist.TCPStore | None = None
        self._group: dist.ProcessGroup | None = None
        self._backend = "gloo"
        self._dirty = True  # the group must be (re)built before the next push
        self._posts: ThreadPoolExecutor | None = None

    # ---------------------------------------------------------------------------------------- collectives

    def _bcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def _gather(self, obj: Any) -> list[Any]:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=self.control_group)
        return out

    # ------------------------------------------------------------------------------------------- rank 0

    def _probe(self) -> list[_Member]:
        """The servers that answer and serve a policy of this trainer's shape (rank 0)."""
        members = []
        for url in self.client.urls:
            card = None if self.client.is_down(url) else self.client.models(url)
            if card is None:
                print(f"[push] {url} gives no model card (down, or refusing the token): left out (stale)", flush=True)
                continue
            info = (card.get("data") or [{}])[0]
            if info.get("policy_manifest") != self.manifest:
                print(f"[push] {url} serves a policy of another shape: left out (stale)", flush=True)
                continue
            members.append(_Member(url, str(info.get("server_id")), int(info.get("weight_receivers", 1)),
                                   dict(info.get("device") or {"type": "cpu"})))  # fmt: skip
        return members

    def _backend_for(self, senders: list[dict], members: list[_Member]) -> str:
        receivers = [m.device for m in members]
        shared = {s.get("gpu_uuid") for s in senders} & {r.get("gpu_uuid") for r in receivers}
        all_cuda = all(s["type"] == "cuda" for s in senders) and all(r.get("type") == "cuda" for r in receivers)
        return "nccl" if all_cuda and not (shared - {None}) else "gloo"

    # ------------------------------------------------------------------------------------------- public

    def push(self, step: int) -> list[str]:
        """Land the current policy as ``step`` in every reachable server; returns the servers that hold it.

        A collective over the trainer's ranks. Servers that do not confirm are stale (the client sends them
        nothing) and the groups are rebuilt at the next push.

        Raises:
            RuntimeError: no server confirmed the push (after one retry with freshly built groups).
        """
        for attempt in range(2):
            confirmed, errors = self._push_once(step)
            if confirmed:
                return confirmed
            self._dirty = True
            if self.rank == 0:
                print(f"[push] step {step} landed nowhere (attempt {attempt + 1}): {'; '.join(errors)}", flush=True)
        raise RuntimeError(f"the policy push of step {step} landed in no rollout server: {'; '.join(errors)}")

    def _push_once(self, step: int) -> tuple[list[str], list[str]]:
        decision = None
        if self.rank == 0:
            members = self._probe()
            changed = [(m.url, m.server_id) for m in members] != [(m.url, m.server_id) for m in self.members]
            decision = {"members": [asdict(m) for m in members], "rebuild": self._dirty or changed}
        decision = self._bcast(decision)
        members = [_Member(**m) for m in decision["members"]]
        if not members:
            return [], ["no rollout server answered with a policy of the trainer's shape"]
        if decision["rebuild"]:
            built = self._rebuild(members)
            if not built:
                return [], ["building the weight-update groups failed"]
        self.members = members

        # rank 0 posts the update to every member (each answers once the push landed); senders broadcast.
        posts = {}
        if self.rank == 0:
            self.client.begin_push(step)  # rollouts running meanwhile (asynchronous GRPO) may come back at `step`
            body = {
                "step": int(step), "run_id": self.client.run_id, "dtype": dtype_name(self.dtype),
                "plan": plan_to_wire(self.plans), "timeout_s": self.push_timeout,
            }  # fmt: skip
            if self._posts is None:  # kept across pushes: a step starts no threads
                self._posts = ThreadPoolExecutor(max_workers=8, thread_name_prefix="push")
            posts = {
                m.url: self._posts.submit(self.client.post_once, m.url, "/v1/weights/update", body,
                                          self.push_timeout + 30.0)
                for m in members
            }  # fmt: skip
        send_error = None
        if self.streams:
            from nemo_logitavg.models.conversion.streaming import iter_hf_buckets

            try:
                # Only the sender (TP rank 0) needs the full tensors: the TP peers send it their shards.
                buckets = iter_hf_buckets(self.model, self.cfg, self.bucket_bytes, dst=0)
                if self.is_sender:
                    send_buckets(self._group, buckets, self.plans[self.stage], self._backend)
                else:
                    for bucket in buckets:  # the TP peers take part in the per-tensor gathers
                        del bucket  # dropped before the next one is built
            except RuntimeError as exc:  # a receiver died mid-push: gloo/NCCL raise, the group is broken
                send_error = f"rank {self.rank}: {exc}"
        results = {url: future.result() for url, future in posts.items()}
        outcome = None
        if self.rank == 0:
            confirmed = [u for u, (payload, _) in results.items() if payload and payload.get("policy_step") == step]
            errors = [f"{u}: {err}" for u, (_, err) in results.items() if err]
            outcome = {"confirmed": confirmed, "errors": errors}
        sender_errors = [e for e in self._gather(send_error) if e]
        outcome = self._bcast(outcome)
        confirmed, errors = outcome["confirmed"], outcome["errors"] + sender_errors
        if sender_errors or len(confirmed) != len(members):
            self._dirty = True  # the group lost a member (or is broken): rebuild before the next push
        if self.rank == 0:
            self.client.mark_pushed(step, confirmed)
            for m in members:
                if m.url not in confirmed:
                    print(f"[push] {m.url} did not confirm step {step}: stale until a later push", flush=True)
        return confirmed, errors

    def _rebuild(self, members: list[_Member]) -> bool:
        """Every sender hosts a new store; rank 0 asks each member to join; all construct the groups."""
        self._group, self._store = None, None
        name = new_build_name() if self.rank == 0 else None
        name = self._bcast(name)
        world = 1 + sum(m.receivers for m in members)
        mine = None
        if self.is_sender:
            host = local_address_toward(urlsplit_host(members[0].url))
            timeout = datetime.timedelta(seconds=self.push_timeout)
            self._store = dist.TCPStore(host, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
            uuid_ = str(torch.cuda.get_device_properties(self.device).uuid) if self.device.type == "cuda" else None
            mine = {"stage": self.stage, "host": host, "port": self._store.port, "type": self.device.type,
                    "gpu_uuid": uuid_}  # fmt: skip
        senders = sorted((s for s in self._gather(mine) if s), key=lambda s: s["stage"])
        backend = self._backend_for(senders, members)
        specs = [
            GroupSpec(s["stage"], s["host"], s["port"], world, backend, f"{name}_stage{s['stage']}", self.push_timeout)
            for s in senders
        ]
        joined_ok = True
        if self.rank == 0:
            rank, body_groups = 1, [spec.as_dict() for spec in specs]
            for m in members:
                _, err = self.client.post_once(m.url, "/v1/weights/join", {"groups": body_groups, "rank": rank}, 30.0)
                if err:
                    print(f"[push] {m.url} refused to join the weight-update group: {err}", flush=True)
                    joined_ok = False
                rank += m.receivers
        joined_ok = self._bcast(joined_ok)
        if not joined_ok:
            return False
        error = None
        if self.is_sender:
            try:
                self._group = open_group(specs[self.stage], 0, store=self._store)
            except RuntimeError as exc:
                error = f"rank {self.rank}: {exc}"
        errors = [e for e in self._gather(error) if e]
        if errors:
            if self.rank == 0:
                print(f"[push] building the weight-update groups failed: {'; '.join(errors)}", flush=True)
            return False
        self._backend, self._dirty = backend, False
        if self.rank == 0:
            print(f"[push] weight-update groups built over {backend}: {len(members)} server(s), {world} ranks a "
                  f"stage, {self.stages} stage(s)", flush=True)  # fmt: skip
        return True


def urlsplit_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or "127.0.0.1"

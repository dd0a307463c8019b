"""The trainer's side of the collective policy push (docs/design.md §2, §7b): ``PolicyPusher`` streams the
Hugging Face-named policy tensors, bucket by bucket, straight into every rollout server's engine over
weight-update process groups of their own. The wire format (groups, plans, buckets) is
``nemo_logitavg.rollout.weight_wire``; the servers receive with ``nemo_logitavg.rollout.weight_receiver``.

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

The sender of stage ``s`` is its TP-rank-0 of DP-rank-0; the other TP ranks of DP replica 0 take part in the
per-tensor gathers (``iter_hf_buckets``). This module runs on the trainer only (it needs megatron).
"""

from __future__ import annotations

import datetime
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from nemo_logitavg.models.builder import LlamaConfig
from nemo_logitavg.models.conversion.mapping import hf_bucket_plan
from nemo_logitavg.models.conversion.streaming import iter_hf_buckets
from nemo_logitavg.rollout.client import RolloutClient
from nemo_logitavg.rollout.weight_wire import (
    DEFAULT_BUCKET_BYTES,
    GroupSpec,
    dtype_name,
    local_address_toward,
    open_group,
    plan_to_wire,
    policy_manifest,
    send_buckets,
)


def new_build_name() -> str:
    """A fresh name for one build of the weight-update groups (stores and groups of builds never mix)."""
    return f"nemo_logitavg_push_{uuid.uuid4().hex[:12]}"


def urlsplit_host(url: str) -> str:
    """The host of a server URL (``127.0.0.1`` when it names none)."""
    return urlsplit(url).hostname or "127.0.0.1"


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
        cfg: LlamaConfig,
        client: RolloutClient | None,
        bucket_bytes: int | None = None,
        push_timeout: float = 600.0,
        control_group: dist.ProcessGroup | None = None,
    ) -> None:
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
        self.manifest = policy_manifest(entry for plan in self.plans.values() for bucket in plan for entry in bucket)
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
        """One try of ``push``, a collective: the servers holding ``step`` now, and the errors of the others."""
        members, rebuild = self._agree_on_members()
        if not members:
            return [], ["no rollout server answered with a policy of the trainer's shape"]
        if rebuild and not self._rebuild(members):
            return [], ["building the weight-update groups failed"]
        self.members = members
        # rank 0 posts the update to every member (each answers once the push landed); senders broadcast.
        posts = self._post_update(step, members) if self.rank == 0 else {}
        send_error = self._send_policy()
        return self._settle(step, members, posts, send_error)

    def _agree_on_members(self) -> tuple[list[_Member], bool]:
        """Rank 0 probes the servers and decides whether the groups must be rebuilt; every rank learns both."""
        decision = None
        if self.rank == 0:
            members = self._probe()
            changed = [(m.url, m.server_id) for m in members] != [(m.url, m.server_id) for m in self.members]
            decision = {"members": [asdict(m) for m in members], "rebuild": self._dirty or changed}
        decision = self._bcast(decision)
        return [_Member(**m) for m in decision["members"]], decision["rebuild"]

    def _post_update(self, step: int, members: list[_Member]) -> dict[str, Future]:
        """Rank 0: ``POST /v1/weights/update`` to every member, in threads (each answers once the push landed)."""
        self.client.begin_push(step)  # rollouts running meanwhile (asynchronous GRPO) may come back at `step`
        body = {
            "step": int(step), "run_id": self.client.run_id, "dtype": dtype_name(self.dtype),
            "plan": plan_to_wire(self.plans), "timeout_s": self.push_timeout,
        }  # fmt: skip
        if self._posts is None:  # kept across pushes: a step starts no threads
            self._posts = ThreadPoolExecutor(max_workers=8, thread_name_prefix="push")
        return {
            m.url: self._posts.submit(self.client.post_once, m.url, "/v1/weights/update", body,
                                      self.push_timeout + 30.0)
            for m in members
        }  # fmt: skip

    def _send_policy(self) -> str | None:
        """This rank's part of the broadcast of its stage's buckets; the error that broke it, if one did."""
        if not self.streams:
            return None
        try:
            # Only the sender (TP rank 0) needs the full tensors: the TP peers send it their shards.
            buckets = iter_hf_buckets(self.model, self.cfg, self.bucket_bytes, dst=0)
            if self.is_sender:
                # The whole push, not each bucket, must land within push_timeout: past it, this group is aborted
                # (NCCL never raises on the host by itself; weight_wire.complete_works).
                deadline = time.monotonic() + self.push_timeout
                send_buckets(self._group, buckets, self.plans[self.stage], self._backend, deadline)
            else:
                for bucket in buckets:  # the TP peers take part in the per-tensor gathers
                    del bucket  # dropped before the next one is built
        except RuntimeError as exc:  # a receiver died mid-push (gloo raises; the deadline aborts): group broken
            return f"rank {self.rank}: {exc}"
        return None

    def _settle(
        self, step: int, members: list[_Member], posts: dict[str, Future], send_error: str | None
    ) -> tuple[list[str], list[str]]:
        """The members' answers and every sender's error, agreed by all ranks; unconfirmed members are stale."""
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

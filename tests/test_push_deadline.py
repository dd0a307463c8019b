"""A push gives up by its deadline on both backends (issue 23, item 3): the sender completes its broadcasts by
host-side polling (``weight_wire.complete_works``), and past the deadline aborts that weight-update group only
and raises the ``RuntimeError`` the pusher's failure path already handles (server stale, group rebuilt).

On NCCL ``work.wait()`` returns at once and nothing raises on the host; a stand-in work that behaves so (never
completed, ``wait()`` a no-op) takes its place over a real gloo group here. A real receiver that joins and never
receives (gloo) shows the same without any stand-in."""

from __future__ import annotations

import datetime
import multiprocessing
import time
import uuid

import pytest
import torch
import torch.distributed as dist

from nemo_logitavg.rollout import weight_wire
from nemo_logitavg.rollout.weight_wire import GroupSpec, PushAborted, open_group, send_buckets

MARGIN_S = 5.0  # seconds of slack on a loaded 2-core machine; the deadlines below are whole seconds


class NcclLikeWork:
    """What an NCCL broadcast to a dead receiver looks like on the host: never completed, ``wait()`` returns."""

    def __init__(self) -> None:
        self.waits = 0

    def is_completed(self) -> bool:
        return False

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        self.waits += 1
        return True


def _solo_group() -> dist.ProcessGroup:
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    return open_group(GroupSpec(0, "127.0.0.1", store.port, 1, "gloo", f"t{uuid.uuid4().hex}", 30.0), 0, store=store)


PLAN = [[("a", (4, 3)), ("b", (5,))], [("c", (2, 2))]]


def _buckets():
    return ([(name, torch.ones(shape)) for name, shape in bucket] for bucket in PLAN)


def _with_stand_in(monkeypatch) -> tuple[list[NcclLikeWork], list[object]]:
    works, aborted = [], []
    original_abort = weight_wire.abort_group

    def issue(group, tensor):
        works.append(NcclLikeWork())
        return works[-1]

    def abort(group):
        aborted.append(group)
        original_abort(group)

    monkeypatch.setattr(weight_wire, "_issue_broadcast", issue)
    monkeypatch.setattr(weight_wire, "abort_group", abort)
    return works, aborted


def test_without_polling_an_nccl_like_work_looks_sent(monkeypatch):
    """The defect the polling fixes: with ``wait()`` alone, a broadcast that never completes counts as sent."""
    works, aborted = _with_stand_in(monkeypatch)
    group = _solo_group()
    assert send_buckets(group, _buckets(), PLAN, "gloo", deadline=None) > 0
    assert works and all(w.waits == 1 for w in works) and not aborted


@pytest.mark.parametrize("seconds", [1.0, 3.0])
def test_a_push_that_never_completes_gives_up_by_its_deadline(monkeypatch, seconds):
    works, aborted = _with_stand_in(monkeypatch)
    group = _solo_group()
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:  # the type the pusher's failure path catches
        send_buckets(group, _buckets(), PLAN, "gloo", deadline=start + seconds)
    elapsed = time.monotonic() - start
    assert isinstance(info.value, PushAborted)
    assert seconds <= elapsed <= seconds + MARGIN_S  # waits out the deadline, then gives up
    assert aborted == [group]  # that weight-update group only, once
    assert len(works) == len(PLAN[0]) and all(w.waits == 0 for w in works)  # nothing declared sent


def test_a_push_that_completes_is_unchanged_by_the_deadline():
    group = _solo_group()
    sent = send_buckets(group, _buckets(), PLAN, "gloo", deadline=time.monotonic() + 30)
    assert sent == sum(torch.Size(shape).numel() * 4 for bucket in PLAN for _, shape in bucket)


# --------------------------------------------------------------------- a real receiver that never receives


def _joins_and_sleeps(spec: dict, ready) -> None:
    group = open_group(GroupSpec.from_dict(spec), 1)
    ready.set()
    time.sleep(120)  # joined, never receives
    del group


@pytest.mark.slow
def test_a_receiver_that_joins_and_never_receives_is_given_up_on_by_the_deadline():
    """gloo, no stand-in: the group's own timeout (60 s) is far past the push deadline (2 s); the sender gives
    up at the deadline all the same, and a fresh group (the next push's rebuild) works."""
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    spec = GroupSpec(0, "127.0.0.1", store.port, 2, "gloo", f"t{uuid.uuid4().hex}", 60.0)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_joins_and_sleeps, args=(spec.as_dict(), ready), daemon=True)
    proc.start()
    try:
        group = open_group(spec, 0, store=store)
        assert ready.wait(60)
        plan = [[("big", (16 << 20,))]]  # 64 MiB: more than any socket buffer takes without a receiver
        start = time.monotonic()
        with pytest.raises(PushAborted):
            send_buckets(group, ([("big", torch.ones(16 << 20))] for _ in plan), plan, "gloo", start + 2.0)
        assert 2.0 <= time.monotonic() - start <= 2.0 + MARGIN_S
    finally:
        proc.kill()
        proc.join(30)
    fresh = _solo_group()
    assert send_buckets(fresh, _buckets(), PLAN, "gloo", deadline=time.monotonic() + 30) > 0

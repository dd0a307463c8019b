"""The update phase of a GRPO step: old log-probs, ``epochs x mini_batches`` optimiser steps, reduced metrics.

``update_policy`` runs the actor over this rank's micro-batches (``batching``) with the step's loss (``loss``);
``reduce_update_metrics`` reduces the per-micro-batch metrics over the data-parallel group.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from nemo_logitavg.parallel import rank_device
from nemo_logitavg.trainer.batching import StepBatch, build_micro_batches
from nemo_logitavg.trainer.interfaces import ActorProtocol
from nemo_logitavg.trainer.loss import TOKEN_MEAN_METRICS, make_loss_fn, step_counts


def reduce_update_metrics(step_results: Sequence[Sequence[dict]], mismatch: Sequence[torch.Tensor]) -> dict:
    """The update's metrics from every optimiser step's per-micro-batch results, reduced over the DP group.

    ``step_results[o]`` holds this rank's results of optimiser step ``o`` (``make_loss_fn``'s metrics; empty off
    the last pipeline stage), ``mismatch`` this rank's per-token ``|log pi_old - log pi_rollout|`` tensors. Sums
    are summed, extremes take max / min. ``loss`` and ``kl`` are each optimiser step's total (over its
    micro-batches and DP ranks), averaged over the step's ``epochs x mini_batches`` optimiser steps; the
    per-token metrics are means over every token of every optimiser step. A collective over the DP group
    (every rank calls it); the values are meaningful on the last pipeline stage only.
    """
    steps = len(step_results)
    totals = torch.zeros(steps, 2, dtype=torch.float64)  # per optimiser step: loss, kl
    sums = torch.zeros(len(TOKEN_MEAN_METRICS) + 3, dtype=torch.float64)  # ..., tokens, mismatch sum, count
    extremes = torch.full((3,), -math.inf, dtype=torch.float64)  # ratio_max, -ratio_min, mismatch max
    has_kl = torch.tensor([float(any("kl" in r for results in step_results for r in results))])
    for o, results in enumerate(step_results):
        if not results:
            continue
        zero = results[0]["loss"].new_zeros(())
        keys = ("loss", "kl", *TOKEN_MEAN_METRICS, "tokens")
        # one device-to-host copy per optimiser step: [micro-batch, value]
        rows = torch.stack([torch.stack([r.get(k, zero).double() for k in keys] + [r["ratio_max"].double(),
                            -r["ratio_min"].double()]) for r in results]).cpu()  # fmt: skip
        totals[o] = rows[:, :2].sum(0)
        sums[: len(keys) - 2] += rows[:, 2 : len(keys)].sum(0)
        extremes[:2] = torch.maximum(extremes[:2], rows[:, len(keys) :].amax(0))
    diffs = torch.cat([d.reshape(-1).double().cpu() for d in mismatch]) if mismatch else torch.zeros(0).double()
    sums[-2], sums[-1] = diffs.sum(), diffs.numel()
    if diffs.numel():
        extremes[2] = diffs.max()
    group, device = ps.get_data_parallel_group(), rank_device()  # the DP group is NCCL on GPUs: reduce there
    totals, sums, has_kl, extremes = (t.to(device) for t in (totals, sums, has_kl, extremes))
    for tensor in (totals, sums, has_kl):
        dist.all_reduce(tensor, group=group)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    totals, sums, has_kl, extremes = (t.cpu() for t in (totals, sums, has_kl, extremes))
    tokens = float(sums[len(TOKEN_MEAN_METRICS)].clamp(min=1))
    step_totals = totals.mean(0)
    metrics = {"loss": float(step_totals[0])}
    if has_kl.item():
        metrics["kl"] = float(step_totals[1])
    metrics.update({key: float(sums[i]) / tokens for i, key in enumerate(TOKEN_MEAN_METRICS)})
    metrics["ratio_max"], metrics["ratio_min"] = float(extremes[0]), float(-extremes[1])
    metrics["mismatch/mean_abs"] = float(sums[-2] / sums[-1].clamp(min=1))
    metrics["mismatch/max_abs"] = float(extremes[2]) if sums[-1] > 0 else 0.0
    return metrics


def update_policy(
    cfg: Any, actor: ActorProtocol, batch: StepBatch, reuse_update_logprobs: bool | None = None, step: int | None = None
) -> dict[str, float]:
    """The update phase of one GRPO step: the old log pi_mix, then ``epochs x mini_batches`` optimiser steps.

    The step's sequences split into mini-batches (one optimiser step each), each split over the DP ranks into
    micro-batches by ``build_micro_batches``. ``reuse_update_logprobs`` (default: when ``epochs`` and
    ``mini_batches`` are both 1) skips the separate old-log-prob pass and takes the update forward's own
    log-probs, detached, as the old ones: the same update with one forward fewer. A collective over every rank
    of the actor. Returns the update's metrics (see ``reduce_update_metrics``; the loss-derived ones only on
    the last pipeline stage, which ``GRPOTrainer.fit`` merges into rank 0's record) and its timings.
    ``step`` is the policy step being trained: ``mismatch/*`` counts only the completions it sampled (None: all);
    with ``algorithm.max_staleness > 0`` the loss also reports the importance weights' ``is_truncated_fraction``.
    """
    alg = cfg.algorithm
    count = batch.input_ids.shape[0]
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    per_mini = count // alg.mini_batches
    minis = [list(range(m * per_mini, (m + 1) * per_mini)) for m in range(alg.mini_batches)]
    mini_mbs = build_micro_batches(cfg, batch, minis, dp_rank, dp_size)
    mbs = [mb for group in mini_mbs for mb in group]

    # Old log pi_mix (the proximal policy), on the current weights before the update (the weights that sampled,
    # when synchronous). With a single optimiser step the update forward runs on those same weights: its own
    # log-probs, detached, are the old ones (docs/design.md §7b).
    if reuse_update_logprobs is None:
        reuse_update_logprobs = alg.epochs == 1 and alg.mini_batches == 1
    start = time.monotonic()
    if not reuse_update_logprobs:
        for mb, result in zip(mbs, actor.forward_backward(mbs, forward_only=True), strict=False):
            mb["old_logprobs"] = result["logprobs"]
    old_s = time.monotonic() - start

    start = time.monotonic()
    step_results, grad_norms = [], []
    for _epoch in range(alg.epochs):
        for seqs, mb_list in zip(minis, mini_mbs, strict=True):
            loss_fn = make_loss_fn(cfg, *step_counts(cfg, batch.mask[seqs]), cfg.rollout.max_tokens)
            step_results.append(actor.forward_backward(mb_list, loss_fn))
            _, grad_norm = actor.optimizer_step()
            grad_norms.append(grad_norm)
    update_s = time.monotonic() - start

    on_last_stage = bool(step_results[0])
    if reuse_update_logprobs and on_last_stage:
        for mb, result in zip(mbs, step_results[0], strict=True):
            mb["old_logprobs"] = result["logprobs"]
    # The old log-probs are on the actor's device, the micro-batches on the host: compared where the former are.
    # Only completions sampled by the current weights measure the train/rollout mismatch (stale ones differ by
    # the update too).
    current = [mb["mask"] & (mb["policy_steps"] == step).unsqueeze(1) if step is not None else mb["mask"]
               for mb in mbs]  # fmt: skip
    mismatch = [
        (mb["old_logprobs"] - mb["rollout_logprobs"].to(mb["old_logprobs"].device)).abs()[
            keep.to(mb["old_logprobs"].device)]
        for mb, keep in zip(mbs, current, strict=True)
    ] if on_last_stage else []  # fmt: skip
    reduced = reduce_update_metrics(step_results, mismatch)
    logged = ("loss", "pi_mix_entropy", "kl", "clip_fraction", "approx_kl", "ratio_mean", "ratio_max",
              "mismatch/mean_abs", "mismatch/max_abs")  # fmt: skip
    if alg.max_staleness > 0:
        logged += ("is_truncated_fraction", "is_weight_mean")
    metrics = {k: v for k, v in reduced.items() if k in logged} if on_last_stage else {}
    metrics.update({
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "skipped_steps": float(actor.skipped_steps),
        "time/old_logprobs_s": old_s,
        "time/update_s": update_s,
        "throughput/update_tokens_per_s": float(batch.mask.sum()) * cfg.algorithm.epochs / max(update_s, 1e-9),
    })  # fmt: skip
    return metrics

"""GRPO on pi_mix, one step at a time: rollout -> rewards -> advantages -> actor update -> weight sync.

Rank 0 talks to the rollout servers and grades the completions; every rank receives the step's batch. The
actor recomputes the old log pi_mix before the update (the rollout's own log-probs are kept to report the
train/rollout mismatch), then runs ``epochs x mini_batches`` optimiser steps with the clipped pi_mix loss, and
the new policy streams into the servers over a collective (``weight_sender``; nothing is written to disk
per step). The final save also writes ``run.dir/policy_final/`` (a Hugging Face directory) for evaluation and
release. The KL-GRPO baseline is the same loop with ``ref_weight = 0`` and ``beta > 0``.

Asynchronous GRPO (``algorithm.max_staleness = k >= 1``): on rank 0 a ``RolloutProducer`` thread samples and grades
the rollouts of the next steps while the main thread trains, at most ``k`` steps ahead of the last pushed policy
(the servers serve step ``t`` while step ``t`` trains and sample step ``t + 1 .. t + k`` with it). A push lands
between requests, so one prefetched step may mix completions of two policy steps: each carries its own
``policy_step``, and a completion older than ``t - k`` is dropped, regenerated with its own seed and counted
(``async/dropped_stale``). The update then corrects with the truncated importance weight against the rollout's
log-probs (the decoupled loss of ``algorithms.grpo``). Only rank 0's main thread runs collectives; the producer
only talks HTTP and grades. A checkpoint counts trained steps only: prefetched rollouts are discarded on exit
and regenerated (same seeds) after a resume. ``run.dir/rollouts.jsonl`` records, per trained step, which
prompts were trained and each completion's policy step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nemo_logitavg.algorithms.grpo import aggregate, group_advantages, kl_penalty, policy_loss
from nemo_logitavg.parallel import rank_device, wait_group
from nemo_logitavg.seeds import prompt_seeds, step_seed

# Largest |log pi_mix(trainer) - log pi_mix(rollout)| of a step before the trainer warns (once a run): float32 on
# both sides agrees to ~2e-5 (vLLM, torch engine); a float32 trainer served in bfloat16 is off by ~0.1.
MISMATCH_WARN_MAX = {"float32": 1e-3, "bfloat16": 0.5}


def sample_seed(run_seed: int, step: int) -> int:
    """The rollout seed of a step (``seeds.step_seed``; the servers derive each completion's seed from it)."""
    return step_seed(run_seed, step)


@dataclass
class StepBatch:
    """One step's rollouts as training tensors (``B`` = prompts x group_size, ``L`` = longest sequence - 1).

    ``targets[b, t]`` is the token predicted at position ``t``; ``mask`` marks completion tokens that count;
    ``rollout_logprobs`` holds the servers' log pi_mix at the same places; ``lengths[b]`` is the number of
    positions sequence ``b`` uses (its tokens - 1; the rest is padding); ``policy_steps[b]`` the step that
    sampled completion ``b`` (its ``policy_step``).
    """

    input_ids: torch.Tensor  # [B, L] int64
    targets: torch.Tensor  # [B, L] int64
    mask: torch.Tensor  # [B, L] bool
    rollout_logprobs: torch.Tensor  # [B, L] float32
    advantages: torch.Tensor  # [B] float32
    rewards: torch.Tensor  # [B] float32
    truncated: torch.Tensor  # [B] bool
    lengths: torch.Tensor  # [B] int64
    policy_steps: torch.Tensor  # [B] int64: the policy step whose weights sampled each completion


def pack_rollouts(
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Sequence[Any]],
    rewards: Sequence[float],
    group_size: int,
    normalize_std: bool = True,
    mask_truncated: bool = False,
    pad_id: int = 0,
) -> StepBatch:
    """Lay out prompt + completion token sequences, right-padded, with the completion tokens masked in.

    ``completions[p]`` are prompt p's ``group_size`` completions (objects with ``token_ids``, ``logprobs``,
    ``finish_reason`` and ``policy_step``), ``rewards`` their rewards in the same order.
    """
    sequences, rollout_lps, starts, truncated, steps = [], [], [], [], []
    for prompt, group in zip(prompt_ids, completions, strict=True):
        if len(group) != group_size:
            raise ValueError(f"expected {group_size} completions per prompt, got {len(group)}")
        for completion in group:
            if len(completion.logprobs) != len(completion.token_ids):
                raise ValueError("a completion's logprobs and token_ids differ in length")
            sequences.append(list(prompt) + list(completion.token_ids))
            rollout_lps.append(list(completion.logprobs))
            starts.append(len(prompt) - 1)  # target index of the first completion token
            truncated.append(completion.finish_reason == "length")
            steps.append(int(completion.policy_step))
    length = max(len(s) for s in sequences) - 1
    count = len(sequences)
    input_ids = torch.full((count, length), pad_id, dtype=torch.long)
    targets = torch.full((count, length), pad_id, dtype=torch.long)
    mask = torch.zeros(count, length, dtype=torch.bool)
    rollout_logprobs = torch.zeros(count, length)
    for i, (seq, lps, start) in enumerate(zip(sequences, rollout_lps, starts, strict=True)):
        tokens = torch.tensor(seq, dtype=torch.long)
        input_ids[i, : len(seq) - 1] = tokens[:-1]
        targets[i, : len(seq) - 1] = tokens[1:]
        if lps and not (mask_truncated and truncated[i]):
            mask[i, start : start + len(lps)] = True
        rollout_logprobs[i, start : start + len(lps)] = torch.tensor(lps, dtype=torch.float32)
    reward_t = torch.tensor(list(rewards), dtype=torch.float32)
    return StepBatch(
        input_ids=input_ids,
        targets=targets,
        mask=mask,
        rollout_logprobs=rollout_logprobs,
        advantages=group_advantages(reward_t, group_size, normalize_std=normalize_std),
        rewards=reward_t,
        truncated=torch.tensor(truncated),
        lengths=torch.tensor([len(seq) - 1 for seq in sequences], dtype=torch.long),
        policy_steps=torch.tensor(steps, dtype=torch.long),
    )


BUDGET_KEY = "rollout.max_tokens_per_micro_batch"


def plan_micro_batches(
    lengths: Sequence[int], seqs: Sequence[int], dp_size: int, size: int | None = None, max_tokens: int | None = None
) -> list[list[list[int]]]:
    """Which sequences of one mini-batch go into which micro-batch of which DP rank: ``plan[rank][k]``.

    Fixed size (``size``): rank ``r`` takes every ``dp_size``-th sequence, ``size`` at a time. Token budget
    (``max_tokens``, which wins): the sequences, longest first, are dealt to the DP ranks with the fewest tokens
    so far (each rank gets ``len(seqs) / dp_size``), and each rank's share is split first-fit decreasing into
    micro-batches whose rows x longest length stays within the budget; a rank with fewer micro-batches than
    another splits its fullest ones until every rank has the same number (megatron's schedule runs the same
    number of micro-batches on every DP rank). Deterministic: every rank computes the whole plan.

    Raises:
        ValueError: naming ``rollout.max_tokens_per_micro_batch`` when a sequence is longer than the budget, or
            the settings when the mini-batch does not split over the DP ranks.
    """
    if max_tokens is None:
        if size is None or len(seqs) % (dp_size * size):
            raise ValueError(
                f"a mini-batch of {len(seqs)} sequences does not split into data_parallel ({dp_size}) x "
                f"rollout.micro_batch_size ({size}); change rollout.prompts_per_step or algorithm.mini_batches"
            )
        return [[list(seqs[r::dp_size][k : k + size]) for k in range(0, len(seqs) // dp_size, size)]
                for r in range(dp_size)]  # fmt: skip
    if len(seqs) % dp_size:
        raise ValueError(
            f"a mini-batch of {len(seqs)} sequences does not split over data_parallel ({dp_size}) ranks; change "
            "rollout.prompts_per_step or algorithm.mini_batches"
        )
    longest = max(seqs, key=lambda s: lengths[s])
    if lengths[longest] > max_tokens:
        raise ValueError(
            f"a sequence of {lengths[longest]} tokens (prompt + completion) is longer than {BUDGET_KEY} "
            f"({max_tokens}): raise {BUDGET_KEY} to at least the longest prompt + rollout.max_tokens"
        )
    order = sorted(seqs, key=lambda s: (-lengths[s], s))
    share = len(seqs) // dp_size
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    tokens = [0] * dp_size
    for s in order:
        rank = min((r for r in range(dp_size) if len(shares[r]) < share), key=lambda r: (tokens[r], r))
        shares[rank].append(s)
        tokens[rank] += lengths[s]
    plan = []
    for share_seqs in shares:
        bins: list[list[int]] = []  # each bin's first sequence is its longest (the share is sorted)
        for s in share_seqs:
            for rows in bins:
                if (len(rows) + 1) * lengths[rows[0]] <= max_tokens:
                    rows.append(s)
                    break
            else:
                bins.append([s])
        plan.append(bins)
    count = max(len(bins) for bins in plan)
    for bins in plan:  # a rank's share has `share` >= count sequences, so the splits always succeed
        while len(bins) < count:
            fullest = max(range(len(bins)), key=lambda k: (len(bins[k]), -k))
            rows = bins[fullest]
            bins[fullest : fullest + 1] = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    return plan


def micro_batches(batch: StepBatch, groups: Sequence[Sequence[int]], pad_to: int | None = None) -> list[dict]:
    """One micro-batch per group of sequence indices of the step's batch, each ``[rows, length]``.

    ``length`` is ``pad_to`` or else the group's longest sequence: positions past a sequence's end are padding,
    and with causal attention the positions before them do not see them, so truncating changes no result.
    No rounding is needed by the layouts used (no sequence or context parallelism).
    """
    out = []
    for group in groups:
        idx = torch.tensor(list(group))
        length = pad_to or int(batch.lengths[idx].max())
        out.append(
            {
                "input_ids": batch.input_ids[idx, :length],
                "targets": batch.targets[idx, :length],
                "position_ids": torch.arange(length).expand(len(idx), -1),
                "mask": batch.mask[idx, :length],
                "advantages": batch.advantages[idx],
                "rollout_logprobs": batch.rollout_logprobs[idx, :length],
                "policy_steps": batch.policy_steps[idx],
            }
        )
    return out


def build_micro_batches(cfg: Any, batch: StepBatch, minis: Sequence[Sequence[int]], dp_rank: int, dp_size: int
                        ) -> list[list[dict]]:  # fmt: skip
    """This DP rank's micro-batches of each mini-batch: the one place the update's batch layout is decided.

    With ``rollout.max_tokens_per_micro_batch`` set: token-budget micro-batches, each padded to its own longest
    sequence; otherwise ``rollout.micro_batch_size`` sequences each, padded to the step's longest. A packer
    (THD layout with ``PackedSeqParams``) would replace this function.
    """
    budget = cfg.rollout.max_tokens_per_micro_batch
    lengths = batch.lengths.tolist()
    pad_to = None if budget else batch.input_ids.shape[1]
    plans = [plan_micro_batches(lengths, seqs, dp_size, cfg.rollout.micro_batch_size, budget) for seqs in minis]
    return [micro_batches(batch, plan[dp_rank], pad_to) for plan in plans]


class StopRequested:
    """SIGTERM / SIGUSR1 (Slurm preemption) ask the loop to checkpoint at the end of the step and exit.

    The signals are blocked in this thread, not only handled: helper processes started later (reward workers,
    checkpoint writers) inherit the blocked mask, so Slurm signalling every process of the step cannot kill
    them mid-save. Pending signals are collected at the end of each step; threads that do not block them reach
    the handler instead. Create it before anything starts threads or processes (recipes do so first thing).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        print(f"[grpo] received {signal.Signals(signum).name}: checkpointing after this step", flush=True)
        self.requested = True

    def poll(self) -> bool:
        for sig in set(self.SIGNALS) & signal.sigpending():
            signal.sigtimedwait([sig], 0)  # consume it
            self._handle(sig, None)
        return self.requested

    def agreed(self) -> bool:
        """True on every rank if any rank was signalled (a collective).

        A CPU flag over ``wait_group()`` (gloo): the other ranks reach it while rank 0 still evaluates.
        """
        flag = torch.tensor([1.0 if self.poll() else 0.0], device="cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=wait_group())
        return bool(flag.item())


def step_counts(cfg: Any, mask: torch.Tensor) -> tuple[float, int]:
    """``make_loss_fn``'s normalisers of an optimiser step whose sequences' ``mask`` (``[B, L]`` bool) is given."""
    sequences = int(mask.any(1).sum()) if cfg.algorithm.agg == "seq-mean-token-mean" else mask.shape[0]
    return float(mask.sum().clamp(min=1)), max(sequences, 1)


# Per-token metrics of ``policy_loss`` that the loss function returns as sums over a micro-batch's tokens, so that
# the trainer can reduce them over micro-batches and DP ranks and divide once by the total token count.
TOKEN_MEAN_METRICS = ("clip_fraction", "approx_kl", "ratio_mean", "dual_clip_fraction", "pi_mix_entropy",
                      "is_truncated_fraction", "is_weight_mean")  # fmt: skip


def make_loss_fn(cfg: Any, num_tokens: float, num_sequences: int, max_response_length: int) -> Callable:
    """The per-micro-batch pi_mix GRPO loss, normalised over the whole optimiser step (DESIGN §7).

    ``num_tokens`` and ``num_sequences`` are the optimiser step's completion tokens and sequences (for
    ``seq-mean-token-mean``, the sequences with at least one counted token); ``step_counts`` gives both.

    Its metrics are additive over the optimiser step's micro-batches and DP ranks: ``loss`` and ``kl`` are this
    micro-batch's share of the step's total; ``tokens`` counts its masked tokens; each ``TOKEN_MEAN_METRICS``
    entry is a sum over those tokens; ``ratio_max`` / ``ratio_min`` are extremes (-inf / inf when empty).
    """
    alg = cfg.algorithm

    def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor, mb: dict):
        mask, ref_logprobs = mb["mask"], mb.get("ref_logprobs")  # log pi_ref: set by the actor when beta > 0
        # token-mean: the step's token count; the sequence modes: this micro-batch's share of the sequences (for
        # seq-mean-token-mean of those with tokens, the ones its mean runs over), so any split sums exactly.
        rows = mask.any(1).sum() if alg.agg == "seq-mean-token-mean" else torch.tensor(mask.shape[0])
        old = mb["old_logprobs"] if "old_logprobs" in mb else logprobs.detach()  # no old pass: the same weights
        # Asynchronous GRPO: old = the proximal policy, the rollout's log-probs = the behaviour policy (DESIGN §7b).
        behaviour = mb["rollout_logprobs"] if alg.max_staleness > 0 else None
        loss, metrics = policy_loss(
            logprobs, old, mb["advantages"], mask, clip_low=alg.clip_low, clip_high=alg.clip_high,
            agg=alg.agg, dual_clip=alg.dual_clip, max_response_length=max_response_length,
            num_tokens=num_tokens if alg.agg == "token-mean" else None,
            behaviour_logprobs=behaviour, is_cap=alg.is_cap,
        )  # fmt: skip
        share = 1.0 if alg.agg == "token-mean" else rows.to(loss.device, loss.dtype) / num_sequences  # no host sync
        loss = loss * share
        out = {}
        if alg.beta > 0 and ref_logprobs is not None:
            kl = kl_penalty(logprobs, ref_logprobs, alg.kl_estimator)
            kl_term = aggregate(kl, mask, alg.agg, num_tokens if alg.agg == "token-mean" else None,
                                max_response_length) * share  # fmt: skip
            loss = loss + alg.beta * kl_term
            out["kl"] = kl_term.detach()
        tokens = mask.sum()
        metrics["pi_mix_entropy"] = torch.where(mask, entropy, 0.0).sum() / tokens.clamp(min=1)
        for key in TOKEN_MEAN_METRICS:
            if key in metrics:
                out[key] = (metrics[key] * tokens).detach()  # policy_loss gives means over this micro-batch's tokens
        empty = tokens == 0
        out["ratio_max"] = torch.where(empty, -math.inf, metrics["ratio_max"])
        out["ratio_min"] = torch.where(empty, math.inf, metrics["ratio_min"])
        out["tokens"] = tokens.to(torch.float64)
        out["loss"] = loss.detach().clone()  # the schedule divides the returned loss in place
        return loss, out

    return loss_fn


def reduce_update_metrics(step_results: Sequence[Sequence[dict]], mismatch: Sequence[torch.Tensor]) -> dict:
    """The update's metrics from every optimiser step's per-micro-batch results, reduced over the DP group.

    ``step_results[o]`` holds this rank's results of optimiser step ``o`` (``make_loss_fn``'s metrics; empty off
    the last pipeline stage), ``mismatch`` this rank's per-token ``|log pi_old - log pi_rollout|`` tensors. Sums
    are summed, extremes take max / min. ``loss`` and ``kl`` are each optimiser step's total (over its
    micro-batches and DP ranks), averaged over the step's ``epochs x mini_batches`` optimiser steps; the
    per-token metrics are means over every token of every optimiser step. A collective over the DP group
    (every rank calls it); the values are meaningful on the last pipeline stage only.
    """
    from megatron.core import parallel_state as ps

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
    cfg: Any, actor: Any, batch: StepBatch, reuse_update_logprobs: bool | None = None, step: int | None = None
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
    from megatron.core import parallel_state as ps

    alg = cfg.algorithm
    count = batch.input_ids.shape[0]
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    per_mini = count // alg.mini_batches
    minis = [list(range(m * per_mini, (m + 1) * per_mini)) for m in range(alg.mini_batches)]
    mini_mbs = build_micro_batches(cfg, batch, minis, dp_rank, dp_size)
    mbs = [mb for group in mini_mbs for mb in group]

    # Old log pi_mix (the proximal policy), on the current weights before the update (the weights that sampled,
    # when synchronous). With a single optimiser step the update forward runs on those same weights: its own
    # log-probs, detached, are the old ones (DESIGN §7b).
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


def stale_prompts(groups: Sequence[Sequence[Any]], step: int, max_staleness: int) -> list[int]:
    """Indices of the prompts with a completion too old to train on at ``step``: ``policy_step < step - k``.

    Raises:
        RuntimeError: a completion reports a policy step above ``step`` (weights the trainer never pushed).
    """
    future = [c.policy_step for group in groups for c in group if c.policy_step > step]
    if future:
        raise RuntimeError(f"a rollout server reports policy step {max(future)} while the trainer is at step {step}")
    return [i for i, group in enumerate(groups) if any(c.policy_step < step - max_staleness for c in group)]


class RolloutProducer:
    """Rank 0 of asynchronous GRPO: a thread that samples (and grades) step after step, ahead of the trainer.

    ``sample(s)`` makes step ``s``'s payload (HTTP and grading only: no collective runs in this thread). Step ``s``
    starts only once ``s <= pushed + max_staleness`` (``allow(pushed)`` after each push), so it is sampled by
    weights at most ``max_staleness`` steps older than the step that trains on it; ``take(s)`` hands it over.
    Steps from ``end`` on are never sampled (the run stops before them).
    ``weights_wait_s`` adds up the time the producer (so the servers) waited for a push to be allowed on.
    """

    def __init__(self, sample: Callable[[int], dict], first_step: int, max_staleness: int, end: int) -> None:
        self._sample, self._k, self._end = sample, max_staleness, end
        self._cond = threading.Condition()
        self._ready: dict[int, dict] = {}
        self._next, self._allowed = first_step, first_step + max_staleness
        self._error: BaseException | None = None
        self._closed = False
        self.weights_wait_s = 0.0
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
        self._thread.start()

    def allow(self, pushed_step: int) -> None:
        """The servers now serve ``pushed_step``: steps up to ``pushed_step + max_staleness`` may be sampled."""
        with self._cond:
            self._allowed = pushed_step + self._k
            self._cond.notify_all()

    def take(self, step: int) -> tuple[dict, float]:
        """Step ``step``'s payload and the seconds the caller waited for it; re-raises the producer's error."""
        start = time.monotonic()
        with self._cond:
            self._cond.wait_for(lambda: step in self._ready or self._error is not None)
            if step not in self._ready:
                raise RuntimeError(f"the rollout producer failed before step {step}") from self._error
            return self._ready.pop(step), time.monotonic() - start

    def take_weights_wait(self) -> float:
        with self._cond:
            waited, self.weights_wait_s = self.weights_wait_s, 0.0
        return waited

    def close(self) -> int:
        """Stop after the request in progress; returns how many sampled steps are discarded (never trained)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        return len(self._ready)

    def _run(self) -> None:
        while True:
            with self._cond:
                start = time.monotonic()
                self._cond.wait_for(lambda: self._closed or self._next <= self._allowed)
                self.weights_wait_s += time.monotonic() - start
                if self._closed or self._next >= self._end:
                    return
                step, self._next = self._next, self._next + 1
            try:
                payload = self._sample(step)
            except BaseException as exc:  # handed to the trainer's take(): a dead producer must not hang it
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self._ready[step] = payload
                self._cond.notify_all()


class MetricsLog:
    """Per-step scalars to ``metrics.jsonl``, TensorBoard and (when configured) W&B, plus a console progress line."""

    def __init__(
        self, run_dir: str, total_steps: int, wandb_project: str | None = None, config: dict | None = None
    ) -> None:
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.total = total_steps
        self.started = time.monotonic()
        self.first_step: int | None = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except ImportError:  # tensorboard not installed: the JSONL still has everything
            self.tb = None
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("run.wandb_project is set but wandb is not installed: pip install wandb") from None
            # One W&B run per run directory, continued when the job resumes (WANDB_MODE=offline works too).
            id_file = os.path.join(run_dir, "wandb_run_id")
            if os.path.exists(id_file):
                with open(id_file, encoding="utf-8") as fh:
                    run_id = fh.read().strip()
            else:
                run_id = hashlib.sha256(os.path.abspath(run_dir).encode() + os.urandom(8)).hexdigest()[:12]
                with open(id_file, "w", encoding="utf-8") as fh:
                    fh.write(run_id)
            from nemo_logitavg.config import redact_secrets

            config = redact_secrets(config) if config is not None else None  # W&B uploads it: never the token
            self.wandb = wandb.init(project=wandb_project, dir=run_dir, id=run_id, resume="allow", config=config)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.first_step is None:
            self.first_step = step
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        done = step - self.first_step + 1
        eta = (time.monotonic() - self.started) / done * (self.total - step)
        print(
            f"[grpo] step {step}/{self.total}  reward {metrics.get('reward/mean', float('nan')):.3f}  "
            f"len {metrics.get('response/length', 0):.0f}  loss {metrics.get('loss', 0):+.4f}  "
            f"ETA {eta / 60:.1f} min",
            flush=True,
        )


class GRPOTrainer:
    """The loop of ``recipes/grpo.py``: built from a validated ``GRPOConfig``, an actor, and (rank 0) a client.

    Args:
        cfg: the run's ``GRPOConfig``.
        actor: ``LogitAveragingActor`` with weights loaded.
        prompts: records ``{"prompt_ids": [...], "answer": ...}`` of the training set.
        client: a ``RolloutClient`` on rank 0 (None elsewhere).
        score: ``score(completion_texts, answers) -> list[float]`` (rank 0).
        export_policy: ``export_policy(out_dir)`` writes the current policy as a Hugging Face directory (a
            collective): the final ``policy_final/``.
        eval_prompts: held-out records like ``prompts``, scored greedily every ``run.eval_every`` steps.
        stop: the signal watcher, created by the recipe before any thread or child process starts.
    """

    def __init__(self, cfg: Any, actor: Any, prompts: Sequence[dict], client: Any, score: Callable,
                 export_policy: Callable[[str], None], eval_prompts: Sequence[dict] = (),
                 stop: StopRequested | None = None) -> None:  # fmt: skip
        self.cfg, self.actor, self.prompts = cfg, actor, list(prompts)
        self.eval_prompts = list(eval_prompts)
        self.client, self.score, self.export_policy = client, score, export_policy
        self.rank = dist.get_rank()
        self.producer: RolloutProducer | None = None  # rank 0 of asynchronous GRPO, while fit() runs
        if client is not None:
            client.max_staleness = cfg.algorithm.max_staleness
        self.step = 0
        self.position = 0  # index of the next prompt
        self.ckpt_dir = os.path.join(cfg.run.dir, "checkpoints")
        self.final_dir = os.path.join(cfg.run.dir, "policy_final")
        self.log = None
        if self.rank == 0:
            from dataclasses import asdict, is_dataclass

            config = asdict(cfg) if is_dataclass(cfg) else None
            self.log = MetricsLog(cfg.run.dir, cfg.run.steps, cfg.run.wandb_project, config)
        self.stop = stop or StopRequested()
        from nemo_logitavg.weight_sender import PolicyPusher

        bucket = int(cfg.rollout.push_bucket_mb * 2**20) if cfg.rollout.push_bucket_mb else None
        self.pusher = PolicyPusher(actor.gpt_policy, actor.policy_cfg, client, bucket, cfg.rollout.push_timeout,
                                   control_group=wait_group())  # fmt: skip

    # --------------------------------------------------------------------------------------------- state
    def save(self) -> None:
        from nemo_logitavg.checkpointing import save_checkpoint

        if not self.actor.weights_finite():  # never persist NaN weights over a good checkpoint
            raise RuntimeError(f"policy weights are not finite at step {self.step}: checkpoint not written")
        save_checkpoint(self.actor, self.ckpt_dir, self.step, {"position": self.position},
                        keep_last=self.cfg.run.keep_last)  # fmt: skip

    def resume(self) -> bool:
        """Load the newest complete checkpoint if there is one; True when the run resumed."""
        from nemo_logitavg.checkpointing import latest_step, load_checkpoint

        if latest_step(self.ckpt_dir) is None:
            return False
        loaded = load_checkpoint(self.actor, self.ckpt_dir)
        self.step, self.position = loaded.step, int(loaded.extra_state["position"])
        if self.rank == 0:
            print(f"[grpo] resumed from {loaded.path} (step {self.step})", flush=True)
        return True

    def push_policy(self) -> None:
        """Make every reachable server serve the current policy as ``self.step`` (a collective)."""
        self.pusher.push(self.step)

    # ---------------------------------------------------------------------------------------------- step
    def _sample(self, step: int, position: int, only: Sequence[int] | None = None) -> dict:
        """Rank 0: sample and grade the rollouts of ``step``, whose first prompt is ``position`` in the data.

        ``only`` (prompt indices within the step) redoes just those, each with the seed it had in the whole step.
        """
        cfg = self.cfg
        start = time.monotonic()
        indices = list(range(cfg.rollout.prompts_per_step)) if only is None else list(only)
        records = [self.prompts[(position + i) % len(self.prompts)] for i in indices]
        seed = sample_seed(cfg.run.seed, step)
        groups = self.client.generate(
            [r["prompt_ids"] for r in records], n=cfg.algorithm.group_size, max_tokens=cfg.rollout.max_tokens,
            temperature=cfg.algorithm.temperature, top_p=cfg.algorithm.top_p,
            **({"seed": seed} if only is None else {"seeds": prompt_seeds(seed, indices)}),
        )  # fmt: skip
        rollout_s = time.monotonic() - start
        texts = [c.text for group in groups for c in group]
        answers = [r["answer"] for r in records for _ in range(cfg.algorithm.group_size)]
        rewards = self.score(texts, answers)
        return {"records": records, "groups": groups, "rewards": rewards, "rollout_s": rollout_s,
                "reward_s": time.monotonic() - start - rollout_s}  # fmt: skip

    def _rollout(self) -> dict:
        """Rank 0: sample (or take the prefetched), check, grade and pack this step's batch; every rank receives it."""
        cfg, payload = self.cfg, [None]
        if self.rank == 0:
            k = cfg.algorithm.max_staleness
            if self.producer is None:
                got, waited = self._sample(self.step, self.position), None
            else:
                got, waited = self.producer.take(self.step)
            groups, rewards = list(got["groups"]), list(got["rewards"])
            stale = stale_prompts(groups, self.step, k)
            if stale:  # sampled by weights older than step - k: never trained on; redone by the current ones
                redo = self._sample(self.step, self.position, stale)
                size = cfg.algorithm.group_size
                for j, i in enumerate(stale):
                    groups[i] = redo["groups"][j]
                    rewards[i * size : (i + 1) * size] = redo["rewards"][j * size : (j + 1) * size]
                if stale_prompts(groups, self.step, k):
                    raise RuntimeError(f"step {self.step}: regenerated rollouts are still older than {k} steps")
            batch = pack_rollouts([r["prompt_ids"] for r in got["records"]], groups, rewards,
                                  cfg.algorithm.group_size, cfg.algorithm.normalize_std,
                                  cfg.algorithm.mask_truncated)  # fmt: skip
            payload = [{"batch": batch, "rollout_s": got["rollout_s"], "reward_s": got["reward_s"],
                        "rollout_wait_s": got["rollout_s"] + got["reward_s"] if waited is None else waited,
                        "dropped_stale": len(stale) * cfg.algorithm.group_size}]  # fmt: skip
        # The others wait here while rank 0 samples and grades: on the CPU group, whose timeout covers the
        # client's worst case (run.wait_timeout); the batch stays on the host (the actor moves micro-batches).
        dist.broadcast_object_list(payload, src=0, group=wait_group())
        return payload[0]

    def _record_rollouts(self, batch: StepBatch) -> None:
        """Rank 0: append the trained step's identity to ``rollouts.jsonl`` (its prompts' data position, seed,
        and each completion's policy step), so that what was trained can be audited across kills and resumes."""
        record = {"step": self.step, "position": self.position, "prompts": self.cfg.rollout.prompts_per_step,
                  "group_size": self.cfg.algorithm.group_size, "seed": sample_seed(self.cfg.run.seed, self.step),
                  "policy_steps": batch.policy_steps.tolist()}  # fmt: skip
        with open(os.path.join(self.cfg.run.dir, "rollouts.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def train_step(self) -> dict[str, float]:
        """One GRPO step on the current policy; returns the step's metrics (complete on rank 0)."""
        cfg = self.cfg
        got = self._rollout()
        batch: StepBatch = got["batch"]
        update = update_policy(cfg, self.actor, batch, step=self.step)
        staleness = self.step - batch.policy_steps
        if self.rank == 0:
            self._record_rollouts(batch)
        self.step += 1
        self.position += cfg.rollout.prompts_per_step

        start = time.monotonic()
        self.push_policy()
        sync_s = time.monotonic() - start
        weights_wait_s = None
        if self.producer is not None:
            self.producer.allow(self.step)
            weights_wait_s = self.producer.take_weights_wait()

        mask = batch.mask
        metrics = {
            "reward/mean": batch.rewards.mean().item(),
            "reward/accuracy": (batch.rewards > 0.5).float().mean().item(),
            "response/length": (mask.sum(1).float().mean().item()),
            "response/truncated": batch.truncated.float().mean().item(),
            "time/rollout_s": got["rollout_s"],
            "time/reward_s": got["reward_s"],
            "time/weight_sync_s": sync_s,
            "time/rollout_wait_s": got["rollout_wait_s"],
            **update,
        }
        if cfg.algorithm.max_staleness > 0:  # the staleness histogram: fraction of the step's completions per age
            for age in range(cfg.algorithm.max_staleness + 1):
                metrics[f"staleness/{age}"] = (staleness == age).float().mean().item()
            metrics["async/dropped_stale"] = float(got["dropped_stale"])
            if weights_wait_s is not None:
                metrics["time/weights_wait_s"] = weights_wait_s
        return metrics

    _mismatch_warned = False

    def _warn_mismatch(self, max_abs: float) -> None:
        """Warn once a run when the servers' log-probs stray from the trainer's by more than MISMATCH_WARN_MAX."""
        limit = MISMATCH_WARN_MAX[self.cfg.model.dtype]
        if max_abs > limit and not self._mismatch_warned and self.rank == 0:
            self._mismatch_warned = True
            print(f"[grpo] warning: step {self.step}: rollout log-probs differ from the trainer's by up to "
                  f"{max_abs:.3g} (> {limit:g} for model.dtype {self.cfg.model.dtype}); do the servers serve "
                  "the trainer's dtype and weights? (warned once)", flush=True)  # fmt: skip

    def evaluate(self) -> dict[str, float]:
        """Rank 0: greedy pi_mix accuracy on the held-out prompts, through the servers (the current policy)."""
        groups = self.client.generate(
            [r["prompt_ids"] for r in self.eval_prompts], n=1, max_tokens=self.cfg.rollout.max_tokens, temperature=0.0
        )
        scores = self.score([g[0].text for g in groups], [r["answer"] for r in self.eval_prompts])
        return {"eval/accuracy": sum(scores) / len(scores), "eval/problems": float(len(scores))}

    def fit(self) -> None:
        """Run (or resume) until ``run.steps``, checkpointing every ``run.checkpoint_every`` and on a signal."""
        self.resume()
        self.push_policy()  # the servers must serve exactly this policy before the first rollout
        if self.rank == 0 and self.cfg.algorithm.max_staleness > 0:
            # Positions follow from the trained steps alone: the producer's step s starts at this one.
            step0, position0, count = self.step, self.position, self.cfg.rollout.prompts_per_step

            def sample(s: int) -> dict:
                return self._sample(s, position0 + (s - step0) * count)

            self.producer = RolloutProducer(sample, step0, self.cfg.algorithm.max_staleness, end=self.cfg.run.steps)
        try:
            self._fit_loop()
        finally:
            if self.producer is not None:
                discarded = self.producer.close()
                self.producer = None
                if discarded and self.step < self.cfg.run.steps:
                    print(f"[grpo] discarded {discarded} prefetched step(s) after step {self.step} (not trained; "
                          "a resume samples them again)", flush=True)  # fmt: skip
        if self.step >= self.cfg.run.steps:  # the final save: the policy as a Hugging Face directory
            self.export_policy(self.final_dir)
        if self.log is not None:
            self.log.close()

    def _fit_loop(self) -> None:
        period_start = time.monotonic()
        while self.step < self.cfg.run.steps:
            metrics = self.train_step()
            # The loop's period (since the previous step's metrics: its evaluation and checkpoint included).
            now = time.monotonic()
            metrics["time/step_s"], period_start = now - period_start, now
            # Metrics of the step are gathered on the last pipeline stage; send them to rank 0.
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, metrics)
            if self.log is not None:
                merged = dict(metrics)
                for other in gathered:
                    for key, value in other.items():
                        merged.setdefault(key, value)
                every = self.cfg.run.eval_every
                if every and self.eval_prompts and (self.step % every == 0 or self.step == self.cfg.run.steps):
                    merged.update(self.evaluate())
                self.log.write(self.step, merged)
                self._warn_mismatch(merged.get("mismatch/max_abs", 0.0))  # merged: the last stage's figure
            stop = self.stop.agreed()
            if stop or self.step % self.cfg.run.checkpoint_every == 0 or self.step == self.cfg.run.steps:
                self.save()
            if stop:
                if self.rank == 0:
                    print(f"[grpo] stopped at step {self.step} on request; rerun to resume", flush=True)
                break

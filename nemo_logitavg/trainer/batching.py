"""A GRPO step's rollouts as training tensors, and how they split into the update's micro-batches.

``pack_rollouts`` lays out one step's completions (``StepBatch``); ``plan_micro_batches`` decides which sequences of
a mini-batch go to which data-parallel rank and micro-batch (fixed size or token budget); ``build_micro_batches``
cuts this rank's micro-batches out of the step's batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nemo_logitavg.algorithms.grpo import group_advantages
from nemo_logitavg.config import check_batch_split


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


BUDGET_KEY = "train.max_tokens_per_micro_batch"
MINI_BATCH = "a mini-batch (rollout.prompts_per_step x algorithm.group_size / algorithm.mini_batches)"


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
        ValueError: naming ``train.max_tokens_per_micro_batch`` when a sequence is longer than the budget, or
            the settings when the mini-batch does not split over the DP ranks.
    """
    if max_tokens is None:
        check_batch_split(MINI_BATCH, len(seqs), [("data parallel", dp_size), ("train.micro_batch_size", size)])
        return [[list(seqs[r::dp_size][k : k + size]) for k in range(0, len(seqs) // dp_size, size)]
                for r in range(dp_size)]  # fmt: skip
    check_batch_split(MINI_BATCH, len(seqs), [("data parallel", dp_size)])
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

    With ``train.max_tokens_per_micro_batch`` set: token-budget micro-batches, each padded to its own longest
    sequence; otherwise ``train.micro_batch_size`` sequences each, padded to the step's longest. A packer
    (THD layout with ``PackedSeqParams``) would replace this function.
    """
    budget = cfg.train.max_tokens_per_micro_batch
    lengths = batch.lengths.tolist()
    pad_to = None if budget else batch.input_ids.shape[1]
    plans = [plan_micro_batches(lengths, seqs, dp_size, cfg.train.micro_batch_size, budget) for seqs in minis]
    return [micro_batches(batch, plan[dp_rank], pad_to) for plan in plans]

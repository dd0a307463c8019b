"""The GRPO loss of one micro-batch, wired to the optimiser step: normalisers and additive metrics.

``algorithms.grpo`` holds the pure loss; this module decides what it is divided by (the whole optimiser step, over
micro-batches and data-parallel ranks, docs/design.md §7) and which of its metrics the update reduces.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from nemo_logitavg.algorithms.grpo import aggregate, kl_penalty, policy_loss


def step_counts(cfg: Any, mask: torch.Tensor) -> tuple[float, int]:
    """``make_loss_fn``'s normalisers of an optimiser step whose sequences' ``mask`` (``[B, L]`` bool) is given."""
    sequences = int(mask.any(1).sum()) if cfg.algorithm.agg == "seq-mean-token-mean" else mask.shape[0]
    return float(mask.sum().clamp(min=1)), max(sequences, 1)


# Per-token metrics of ``policy_loss`` that the loss function returns as sums over a micro-batch's tokens, so that
# the trainer can reduce them over micro-batches and DP ranks and divide once by the total token count.
TOKEN_MEAN_METRICS = ("clip_fraction", "approx_kl", "ratio_mean", "dual_clip_fraction", "pi_mix_entropy",
                      "is_truncated_fraction", "is_weight_mean")  # fmt: skip


def make_loss_fn(cfg: Any, num_tokens: float, num_sequences: int, max_response_length: int) -> Callable:
    """The per-micro-batch pi_mix GRPO loss, normalised over the whole optimiser step (docs/design.md §7).

    ``num_tokens`` and ``num_sequences`` are the optimiser step's completion tokens and sequences (for
    ``seq-mean-token-mean``, the sequences with at least one counted token); ``step_counts`` gives both.

    Its metrics are additive over the optimiser step's micro-batches and DP ranks: ``loss`` and ``kl`` are this
    micro-batch's share of the step's total; ``tokens`` counts its masked tokens; each ``TOKEN_MEAN_METRICS``
    entry is a sum over those tokens; ``ratio_max`` / ``ratio_min`` are extremes (-inf / inf when empty).

    The returned ``loss_fn(logprobs, entropy, mb)`` takes the actor's log pi_mix and entropy of the targets
    (``[b, s]`` float32) and the micro-batch (``mask`` ``[b, s]`` bool, ``advantages`` ``[b]``, ``rollout_logprobs``
    ``[b, s]``, optionally ``old_logprobs`` and ``ref_logprobs`` ``[b, s]``); it returns the scalar loss and the
    metrics (0-d tensors).
    """
    alg = cfg.algorithm

    def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor, mb: dict):
        mask, ref_logprobs = mb["mask"], mb.get("ref_logprobs")  # log pi_ref: set by the actor when beta > 0
        # token-mean: the step's token count; the sequence modes: this micro-batch's share of the sequences (for
        # seq-mean-token-mean of those with tokens, the ones its mean runs over), so any split sums exactly.
        rows = mask.any(1).sum() if alg.agg == "seq-mean-token-mean" else torch.tensor(mask.shape[0])
        old = mb["old_logprobs"] if "old_logprobs" in mb else logprobs.detach()  # no old pass: the same weights
        # Asynchronous GRPO: old = the proximal policy, the rollout's log-probs = the behaviour policy
        # (docs/design.md §7b).
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

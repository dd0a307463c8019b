"""What the training loops call on the actor and on the rollout client, as typing Protocols.

The real ones, ``models.actor.LogitAveragingActor`` and ``rollout.client.RolloutClient``, satisfy these structurally
(they do not inherit from them); tests check that they do. A Protocol names exactly what the loops use, so a test
double that provides it is enough, and a reader's go-to-definition lands here with the contract written down.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from nemo_logitavg.models.actor import LossFn
from nemo_logitavg.models.builder import LlamaConfig


@runtime_checkable
class CompletionProtocol(Protocol):
    """One sampled completion as the trainer reads it (``rollout.client.Completion``)."""

    token_ids: list[int]
    logprobs: list[float]  # log pi_mix of each token, at the request temperature
    text: str
    finish_reason: str  # "stop" or "length"
    policy_step: int  # the policy step whose weights sampled it


@runtime_checkable
class ActorProtocol(Protocol):
    """The trainable side: a policy (and a frozen reference) that runs micro-batches and optimiser steps.

    ``gpt_policy`` and ``policy_cfg`` are what the weight push streams (the policy's modules and its model config).
    """

    gpt_policy: torch.nn.Module
    policy_cfg: LlamaConfig
    skipped_steps: int  # optimiser steps skipped for a non-finite gradient, so far

    def forward_backward(
        self, micro_batches: Sequence[dict], loss_fn: LossFn | None = None, forward_only: bool = False
    ) -> list[dict]:
        """Per-micro-batch results (``logprobs`` ``[b, s]`` and ``loss_fn``'s metrics), on the last stage only."""
        ...

    def optimizer_step(self) -> tuple[bool, float]:
        """Apply the update; (applied, gradient norm before clipping)."""
        ...

    def weights_finite(self) -> bool:
        """True when every policy weight on every rank is finite (a collective)."""
        ...


@runtime_checkable
class RolloutClientProtocol(Protocol):
    """Rank 0's way to the rollout servers: samples of pi_mix at the pushed policy step."""

    max_staleness: int  # completions of the last k pushed steps are accepted (asynchronous GRPO)

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        *,
        seeds: Sequence[int] | None = None,
    ) -> Sequence[Sequence[CompletionProtocol]]:
        """``n`` completions of each prompt, in prompt order (``seeds``: one per prompt, instead of ``seed``)."""
        ...

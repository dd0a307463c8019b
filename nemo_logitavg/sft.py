"""Supervised fine-tuning of the policy alone: the frozen reference that logit-averaging GRPO starts from.

Records are prompt/response token ids; the loss is the mean negative log-likelihood of the response tokens of
the whole optimiser step (prompt tokens are context only).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def pack_sft(records: Sequence[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """``[B, L]`` input ids, targets, positions and response mask for records with ``prompt_ids``/``response_ids``.

    Sequences are right-padded to the longest; ``mask[b, t]`` is True where ``targets[b, t]`` is a response token.
    The tensors are on the host; the actor moves each micro-batch to its device.
    """
    seqs = [list(r["prompt_ids"]) + list(r["response_ids"]) for r in records]
    length = max(len(s) for s in seqs) - 1
    count = len(seqs)
    input_ids = torch.full((count, length), pad_id, dtype=torch.long)
    targets = torch.full((count, length), pad_id, dtype=torch.long)
    mask = torch.zeros(count, length, dtype=torch.bool)
    for i, (seq, record) in enumerate(zip(seqs, records, strict=True)):
        tokens = torch.tensor(seq, dtype=torch.long)
        input_ids[i, : len(seq) - 1] = tokens[:-1]
        targets[i, : len(seq) - 1] = tokens[1:]
        start = len(record["prompt_ids"]) - 1
        mask[i, start : start + len(record["response_ids"])] = True
    return {
        "input_ids": input_ids,
        "targets": targets,
        "mask": mask,
        "position_ids": torch.arange(length).expand(count, -1),
    }


def nll_loss_fn(num_tokens: float):
    """Response-token NLL normalised by the step's response-token count (all micro-batches and DP ranks)."""

    def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor, mb: dict):
        loss = -(logprobs * mb["mask"]).sum() / num_tokens
        return loss, {"loss": loss.detach().clone(), "tokens": mb["mask"].sum().float()}

    return loss_fn


def train_sft(
    actor: Any,
    records: Sequence[dict],
    steps: int,
    sequences_per_step: int,
    micro_batch_size: int,
    log_path: str | None = None,
    seed: int = 0,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
) -> list[float]:
    """Run ``steps`` optimiser steps over shuffled ``records`` (epochs wrap); returns the losses of the steps run.

    ``sequences_per_step`` counts all data-parallel ranks; each DP rank takes every DP-th sequence. Progress
    goes to the console and, on rank 0, one JSON line per step to ``log_path``. With ``checkpoint_dir``, the
    run checkpoints every ``checkpoint_every`` steps and resumes from the newest checkpoint there (the data
    order is fixed by ``seed``, so a resumed run sees the batches an unbroken one would).
    """
    from megatron.core import parallel_state as ps

    from nemo_logitavg.checkpointing import latest_step, load_checkpoint, save_checkpoint

    if sequences_per_step % micro_batch_size:
        raise ValueError(
            f"sequences_per_step ({sequences_per_step}) must be a multiple of micro_batch_size ({micro_batch_size})"
        )
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    first = 0
    if checkpoint_dir and latest_step(checkpoint_dir) is not None:
        first = load_checkpoint(actor, checkpoint_dir).step
        if dist.get_rank() == 0:
            print(f"[sft] resumed from {checkpoint_dir} at step {first}", flush=True)
    losses, started = [], time.monotonic()
    for step in range(first, steps):
        picked = [records[order[(step * sequences_per_step + i) % len(order)]] for i in range(sequences_per_step)]
        batch = pack_sft(picked)
        num_tokens = float(batch["mask"].sum().clamp(min=1))
        mine = torch.arange(dp_rank, sequences_per_step, dp_size)
        mbs = [
            {k: v[mine[i : i + micro_batch_size]] for k, v in batch.items()}
            for i in range(0, len(mine), micro_batch_size)
        ]
        results = actor.forward_backward(mbs, nll_loss_fn(num_tokens))
        _, grad_norm = actor.optimizer_step()
        # A host scalar (the results may be on the GPU), summed over the world on the default group's gloo part:
        # DP shares add up, stages without a loss add 0, TP ranks hold copies.
        loss = torch.tensor([sum(float(r["loss"]) for r in results)], device="cpu")
        dist.all_reduce(loss)
        losses.append(loss.item() / max(1, ps.get_tensor_model_parallel_world_size()))
        if dist.get_rank() == 0:
            eta = (time.monotonic() - started) / (step + 1 - first) * (steps - step - 1)
            print(f"[sft] step {step + 1}/{steps}  loss {losses[-1]:.4f}  grad-norm {grad_norm:.3f}  "
                  f"ETA {eta / 60:.1f} min", flush=True)  # fmt: skip
            if log_path:
                os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
                with open(log_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": step + 1, "loss": losses[-1], "grad_norm": grad_norm}) + "\n")
        if checkpoint_dir and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(actor, checkpoint_dir, step + 1, keep_last=1)
    return losses

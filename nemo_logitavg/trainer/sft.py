"""Supervised fine-tuning of the policy alone: the frozen reference that logit-averaging GRPO starts from.

Records are prompt/response token ids; the loss is the mean negative log-likelihood of the response tokens of
the whole optimiser step (prompt tokens are context only). Progress goes through the GRPO loop's ``MetricsLog``
(SFT's own jsonl and ``[sft]`` line), and Slurm's stop signal through the same ``StopRequested``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from nemo_logitavg.checkpointing import latest_step, load_checkpoint, save_checkpoint
from nemo_logitavg.config import check_batch_split
from nemo_logitavg.trainer.interfaces import ActorProtocol, LossFn
from nemo_logitavg.trainer.metrics_log import MetricsLog, sft_progress
from nemo_logitavg.trainer.stop import StopRequested


def pack_sft(records: Sequence[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """``[B, L]`` input ids, targets, positions (int64) and response mask (bool) for records with
    ``prompt_ids``/``response_ids`` (``B`` records, ``L`` = the longest prompt + response - 1).

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


def nll_loss_fn(num_tokens: float) -> LossFn:
    """Response-token NLL normalised by the step's response-token count (all micro-batches and DP ranks).

    The returned ``loss_fn(logprobs, entropy, mb)`` takes the log-probs of the targets (``[b, s]`` float32) and the
    micro-batch's ``mask`` (``[b, s]`` bool); it returns the scalar loss and ``{"loss", "tokens"}`` (0-d tensors).
    """

    def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor, mb: dict):
        loss = -(logprobs * mb["mask"]).sum() / num_tokens
        return loss, {"loss": loss.detach().clone(), "tokens": mb["mask"].sum().float()}

    return loss_fn


def train_sft(
    actor: ActorProtocol,
    records: Sequence[dict],
    steps: int,
    sequences_per_step: int,
    micro_batch_size: int,
    log_path: str | None = None,
    seed: int = 0,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    stop: StopRequested | None = None,
) -> list[float]:
    """Run ``steps`` optimiser steps over shuffled ``records`` (epochs wrap); returns the losses of the steps run.

    ``sequences_per_step`` counts all data-parallel ranks; each DP rank takes every DP-th sequence. Progress
    goes to the console and, on rank 0, one JSON line per step to ``log_path``. With ``checkpoint_dir``, the
    run checkpoints every ``checkpoint_every`` steps and resumes from the newest checkpoint there (the data
    order is fixed by ``seed``, so a resumed run sees the batches an unbroken one would). With ``stop`` (created
    before any thread started), a SIGTERM / SIGUSR1 ends the run after the step, checkpointed when
    ``checkpoint_dir`` is set; ``stop.stopped`` is then True on every rank, so the caller does not export.
    """
    check_batch_split("sft: sequences_per_step", sequences_per_step, [("micro_batch_size", micro_batch_size)])
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    first = 0
    if checkpoint_dir and latest_step(checkpoint_dir) is not None:
        first = load_checkpoint(actor, checkpoint_dir).step
        if dist.get_rank() == 0:
            print(f"[sft] resumed from {checkpoint_dir} at step {first}", flush=True)
    log = None
    if dist.get_rank() == 0:
        log_dir, log_name = (os.path.dirname(log_path) or ".", os.path.basename(log_path)) if log_path else (".", None)
        log = MetricsLog(log_dir, steps, filename=log_name, tensorboard=False, progress=sft_progress, sort_keys=False)
    losses = []
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
        if log is not None:
            log.write(step + 1, {"loss": losses[-1], "grad_norm": grad_norm})
        # A signal during the last step changes nothing: the run is complete and the caller exports it.
        stopping = stop is not None and step + 1 < steps and stop.agreed()
        periodic = checkpoint_every and (step + 1) % checkpoint_every == 0
        if checkpoint_dir and (stopping or periodic) and step + 1 < steps:
            save_checkpoint(actor, checkpoint_dir, step + 1, keep_last=1)
        if stopping:
            if dist.get_rank() == 0:
                saved = "rerun to resume" if checkpoint_dir else "nothing saved (checkpoint_every is 0)"
                print(f"[sft] stopped at step {step + 1} on request; {saved}", flush=True)
            break
    if log is not None:
        log.close()
    return losses

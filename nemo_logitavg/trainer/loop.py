"""GRPO on pi_mix, one step at a time: rollout -> rewards -> advantages -> actor update -> weight sync.

Rank 0 talks to the rollout servers and grades the completions; every rank receives the step's batch. The
actor recomputes the old log pi_mix before the update (the rollout's own log-probs are kept to report the
train/rollout mismatch), then runs ``epochs x mini_batches`` optimiser steps with the clipped pi_mix loss, and
the new policy streams into the servers over a collective (``trainer.weight_sender``; nothing is written to disk
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

Read top to bottom: ``fit`` runs ``train_step``, which takes the step's rollouts (``_rollout``, sampled by
``_sample`` or the producer), runs the update (``trainer.update.update_policy``) and pushes the new policy.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

import torch.distributed as dist

from nemo_logitavg.checkpointing import latest_step, load_checkpoint, save_checkpoint
from nemo_logitavg.parallel import wait_group
from nemo_logitavg.seeds import prompt_seeds, step_seed
from nemo_logitavg.trainer.batching import StepBatch, pack_rollouts
from nemo_logitavg.trainer.interfaces import ActorProtocol, RolloutClientProtocol
from nemo_logitavg.trainer.metrics_log import MetricsLog
from nemo_logitavg.trainer.producer import RolloutProducer, stale_prompts
from nemo_logitavg.trainer.stop import StopRequested
from nemo_logitavg.trainer.update import update_policy
from nemo_logitavg.trainer.weight_sender import PolicyPusher

# Largest |log pi_mix(trainer) - log pi_mix(rollout)| of a step before the trainer warns (once a run): float32 on
# both sides agrees to ~2e-5 (vLLM, torch engine); a float32 trainer served in bfloat16 is off by ~0.1.
MISMATCH_WARN_MAX = {"float32": 1e-3, "bfloat16": 0.5}


class GRPOTrainer:
    """The GRPO loop (``trainer.main.run_grpo`` composes it) from a validated ``GRPOConfig``, an actor, a client.

    Args:
        cfg: the run's ``GRPOConfig``.
        actor: ``LogitAveragingActor`` with weights loaded (what it must provide: ``interfaces.ActorProtocol``).
        prompts: records ``{"prompt_ids": [...], "answer": ...}`` of the training set.
        client: a ``RolloutClient`` on rank 0 (None elsewhere; ``interfaces.RolloutClientProtocol``).
        score: ``score(completion_texts, answers) -> list[float]`` (rank 0).
        export_policy: ``export_policy(out_dir)`` writes the current policy as a Hugging Face directory (a
            collective): the final ``policy_final/``.
        eval_prompts: held-out records like ``prompts``, scored greedily every ``run.eval_every`` steps.
        stop: the signal watcher, created by ``run_grpo`` before any thread or child process starts.
    """

    def __init__(self, cfg: Any, actor: ActorProtocol, prompts: Sequence[dict],
                 client: RolloutClientProtocol | None, score: Callable, export_policy: Callable[[str], None],
                 eval_prompts: Sequence[dict] = (), stop: StopRequested | None = None) -> None:  # fmt: skip
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
            config = asdict(cfg) if is_dataclass(cfg) else None
            self.log = MetricsLog(cfg.run.dir, cfg.run.steps, cfg.run.wandb_project, config)
        self.stop = stop or StopRequested()
        bucket = int(cfg.rollout.push_bucket_mb * 2**20) if cfg.rollout.push_bucket_mb else None
        self.pusher = PolicyPusher(actor.gpt_policy, actor.policy_cfg, client, bucket, cfg.rollout.push_timeout,
                                   control_group=wait_group())  # fmt: skip

    # ---------------------------------------------------------------------------------------- loop
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

    # ---------------------------------------------------------------------------------------- step
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

    def _sample(self, step: int, position: int, only: Sequence[int] | None = None) -> dict:
        """Rank 0: sample and grade the rollouts of ``step``, whose first prompt is ``position`` in the data.

        ``only`` (prompt indices within the step) redoes just those, each with the seed it had in the whole step.
        """
        cfg = self.cfg
        start = time.monotonic()
        indices = list(range(cfg.rollout.prompts_per_step)) if only is None else list(only)
        records = [self.prompts[(position + i) % len(self.prompts)] for i in indices]
        seed = step_seed(cfg.run.seed, step)
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

    def _record_rollouts(self, batch: StepBatch) -> None:
        """Rank 0: append the trained step's identity to ``rollouts.jsonl`` (its prompts' data position, seed,
        and each completion's policy step), so that what was trained can be audited across kills and resumes."""
        record = {"step": self.step, "position": self.position, "prompts": self.cfg.rollout.prompts_per_step,
                  "group_size": self.cfg.algorithm.group_size, "seed": step_seed(self.cfg.run.seed, self.step),
                  "policy_steps": batch.policy_steps.tolist()}  # fmt: skip
        with open(os.path.join(self.cfg.run.dir, "rollouts.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def push_policy(self) -> None:
        """Make every reachable server serve the current policy as ``self.step`` (a collective)."""
        self.pusher.push(self.step)

    def evaluate(self) -> dict[str, float]:
        """Rank 0: greedy pi_mix accuracy on the held-out prompts, through the servers (the current policy)."""
        groups = self.client.generate(
            [r["prompt_ids"] for r in self.eval_prompts], n=1, max_tokens=self.cfg.rollout.max_tokens, temperature=0.0
        )
        scores = self.score([g[0].text for g in groups], [r["answer"] for r in self.eval_prompts])
        return {"eval/accuracy": sum(scores) / len(scores), "eval/problems": float(len(scores))}

    _mismatch_warned = False

    def _warn_mismatch(self, max_abs: float) -> None:
        """Warn once a run when the servers' log-probs stray from the trainer's by more than MISMATCH_WARN_MAX."""
        limit = MISMATCH_WARN_MAX[self.cfg.model.dtype]
        if max_abs > limit and not self._mismatch_warned and self.rank == 0:
            self._mismatch_warned = True
            print(f"[grpo] warning: step {self.step}: rollout log-probs differ from the trainer's by up to "
                  f"{max_abs:.3g} (> {limit:g} for model.dtype {self.cfg.model.dtype}); do the servers serve "
                  "the trainer's dtype and weights? (warned once)", flush=True)  # fmt: skip

    # --------------------------------------------------------------------------------------- state
    def save(self) -> None:
        """Checkpoint the policy, optimiser and data position as ``self.step`` (a collective)."""
        if not self.actor.weights_finite():  # never persist NaN weights over a good checkpoint
            raise RuntimeError(f"policy weights are not finite at step {self.step}: checkpoint not written")
        save_checkpoint(self.actor, self.ckpt_dir, self.step, {"position": self.position},
                        keep_last=self.cfg.run.keep_last)  # fmt: skip

    def resume(self) -> bool:
        """Load the newest complete checkpoint if there is one; True when the run resumed."""
        if latest_step(self.ckpt_dir) is None:
            return False
        loaded = load_checkpoint(self.actor, self.ckpt_dir)
        self.step, self.position = loaded.step, int(loaded.extra_state["position"])
        if self.rank == 0:
            print(f"[grpo] resumed from {loaded.path} (step {self.step})", flush=True)
        return True

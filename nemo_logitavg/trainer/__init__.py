"""The training loops: GRPO on pi_mix (``loop``) and SFT (``sft``), and the rooms they are built from.

    loop.py         GRPOTrainer: fit -> train_step -> rollout -> update, and the weight push after each step
    batching.py     a step's rollouts as tensors (StepBatch) and their micro-batches
    loss.py         the micro-batch loss wired to the optimiser step's normalisers
    update.py       the update phase and its data-parallel metric reduction
    producer.py     asynchronous GRPO's rollout thread and staleness check
    metrics_log.py  jsonl / TensorBoard / W&B / console logging (GRPO and SFT)
    stop.py         the SIGTERM / SIGUSR1 handler (GRPO and SFT)
    interfaces.py   Protocols of what the loops call on the actor and the rollout client
    sft.py          supervised fine-tuning
    main.py         composition: run_grpo / run_sft, and ``python -m nemo_logitavg.trainer.main``

``main`` is not imported here, so that ``python -m nemo_logitavg.trainer.main`` runs it fresh.
"""

from nemo_logitavg.trainer.batching import (
    BUDGET_KEY,
    StepBatch,
    build_micro_batches,
    micro_batches,
    pack_rollouts,
    plan_micro_batches,
)
from nemo_logitavg.trainer.interfaces import ActorProtocol, CompletionProtocol, RolloutClientProtocol
from nemo_logitavg.trainer.loop import MISMATCH_WARN_MAX, GRPOTrainer
from nemo_logitavg.trainer.loss import TOKEN_MEAN_METRICS, make_loss_fn, step_counts
from nemo_logitavg.trainer.metrics_log import MetricsLog
from nemo_logitavg.trainer.producer import RolloutProducer, stale_prompts
from nemo_logitavg.trainer.sft import nll_loss_fn, pack_sft, train_sft
from nemo_logitavg.trainer.stop import StopRequested
from nemo_logitavg.trainer.update import reduce_update_metrics, update_policy

__all__ = [
    "BUDGET_KEY",
    "MISMATCH_WARN_MAX",
    "TOKEN_MEAN_METRICS",
    "ActorProtocol",
    "CompletionProtocol",
    "GRPOTrainer",
    "MetricsLog",
    "RolloutClientProtocol",
    "RolloutProducer",
    "StepBatch",
    "StopRequested",
    "build_micro_batches",
    "make_loss_fn",
    "micro_batches",
    "nll_loss_fn",
    "pack_rollouts",
    "pack_sft",
    "plan_micro_batches",
    "reduce_update_metrics",
    "stale_prompts",
    "step_counts",
    "train_sft",
    "update_policy",
]

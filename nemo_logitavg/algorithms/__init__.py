"""RL algorithms as pure torch functions (no Megatron, nothing else of the package)."""

from nemo_logitavg.algorithms.grpo import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    aggregate,
    group_advantages,
    kl_penalty,
    policy_loss,
)

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "aggregate",
    "group_advantages",
    "kl_penalty",
    "policy_loss",
]

"""Typed YAML configs with command-line overrides (OmegaConf), validated when loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def load_config(schema: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read ``path`` into the dataclass ``schema``, apply ``key=value`` overrides, return a typed object.

    Raises:
        ValueError: naming the file and key when a key is unknown, a value has the wrong type, or an
            override is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, OmegaConf.load(path))
    except OmegaConfBaseException as exc:
        raise ValueError(f"{path}: {_describe(exc)}") from None
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides or [])))
    except OmegaConfBaseException as exc:
        raise ValueError(f"command-line override: {_describe(exc)}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ValueError(f"{path}: required key(s) not set: {', '.join(missing)}")
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    message = getattr(exc, "msg", None) or str(exc).splitlines()[0]
    return f"key '{key}': {message}" if key else message


# ------------------------------------------------------------------------------------------------ GRPO schema


@dataclass
class ModelSection:
    policy: str = MISSING  # Hugging Face directory the policy starts from (the SFT model)
    reference: str | None = None  # the frozen reference; None: the same directory as the policy
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    dtype: str = "float32"  # float32 | bfloat16


@dataclass
class AlgorithmSection:
    ref_weight: float = 0.5  # a in m = (1 - a) z_pol + a z_ref; 0 with beta > 0 is the KL-GRPO baseline
    group_size: int = 8
    normalize_std: bool = True  # False: Dr. GRPO advantages
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    beta: float = 0.0  # KL(pi_pol || pi_ref) weight, for the baseline
    kl_estimator: str = "k3"
    epochs: int = 1  # optimisation passes over each step's rollouts
    mini_batches: int = 1  # optimiser steps per epoch
    mask_truncated: bool = False  # drop completions cut at max_tokens from the loss
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class RolloutSection:
    urls: list[str] = field(default_factory=list)  # running servers; empty: the recipe starts one
    token: str | None = None
    timeout: float = 600.0
    prompts_per_step: int = 8
    max_tokens: int = 256
    micro_batch_size: int = 4  # sequences per forward/backward micro-batch


@dataclass
class DataSection:
    train: str = MISSING  # prompt jsonl: {"prompt": ..., "answer": ...}
    test: str | None = None
    reward: str = "math"  # math | mcq
    reward_timeout: float = 5.0


@dataclass
class OptimSection:
    lr: float = 1e-6
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    warmup_steps: int = 0


@dataclass
class RunSection:
    dir: str = "runs/grpo"  # checkpoints, metrics.jsonl, TensorBoard events, weight-sync directory
    steps: int = 100
    seed: int = 1234
    checkpoint_every: int = 10
    keep_last: int = 2
    eval_every: int = 0
    wandb_project: str | None = None  # also log to Weights & Biases (WANDB_MODE=offline for no network)


@dataclass
class GRPOConfig:
    model: ModelSection = field(default_factory=ModelSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    def validate(self) -> GRPOConfig:
        """Check ranges and names; raise ValueError naming the key."""
        from nemo_logitavg.algorithms.grpo import AGGREGATIONS, KL_ESTIMATORS

        a, r = self.algorithm, self.rollout
        checks = [
            (0.0 <= a.ref_weight <= 1.0, "algorithm.ref_weight", "must lie in [0, 1]"),
            (a.group_size >= 2, "algorithm.group_size", "must be >= 2 (advantages are relative to the group)"),
            (a.agg in AGGREGATIONS, "algorithm.agg", f"must be one of {', '.join(AGGREGATIONS)}"),
            (a.kl_estimator in KL_ESTIMATORS, "algorithm.kl_estimator", f"must be one of {', '.join(KL_ESTIMATORS)}"),
            (a.beta >= 0.0, "algorithm.beta", "must be >= 0"),
            (a.temperature > 0.0, "algorithm.temperature", "must be > 0"),
            (0.0 < a.top_p <= 1.0, "algorithm.top_p", "must lie in (0, 1]"),
            (a.epochs >= 1, "algorithm.epochs", "must be >= 1"),
            (a.mini_batches >= 1, "algorithm.mini_batches", "must be >= 1"),
            (r.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1"),
            (r.max_tokens >= 1, "rollout.max_tokens", "must be >= 1"),
            (r.micro_batch_size >= 1, "rollout.micro_batch_size", "must be >= 1"),
            (self.model.dtype in ("float32", "bfloat16"), "model.dtype", "must be float32 or bfloat16"),
            (self.data.reward in ("math", "mcq"), "data.reward", "must be math or mcq"),
            (self.run.steps >= 1, "run.steps", "must be >= 1"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise ValueError(f"config key {key} {why}, got {_get(self, key)!r}")
        sequences = r.prompts_per_step * a.group_size
        if sequences % (a.mini_batches * r.micro_batch_size):
            raise ValueError(
                f"config: rollout.prompts_per_step x algorithm.group_size = {sequences} sequences must split into "
                f"algorithm.mini_batches ({a.mini_batches}) x rollout.micro_batch_size ({r.micro_batch_size})"
            )
        return self


def _get(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class SFTConfig:
    model: str = MISSING  # Hugging Face directory to fine-tune (with its tokenizer)
    data: str = MISSING  # jsonl: {"prompt": ..., "response": ...}
    out: str = MISSING  # where the fine-tuned Hugging Face directory is written
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    steps: int = 100
    sequences_per_step: int = 32
    micro_batch_size: int = 8
    lr: float = 1e-4
    min_lr: float | None = None  # set: cosine decay from lr to min_lr over the run's steps
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    warmup_steps: int = 0
    seed: int = 1234
    log: str | None = None  # metrics jsonl (default: <out>.metrics.jsonl)
    checkpoint_every: int = 0  # > 0: checkpoint into <out>.checkpoints every N steps; a rerun resumes there

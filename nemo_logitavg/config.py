"""Typed YAML configs with command-line overrides (OmegaConf), validated when loaded: the schemas of GRPO (with its
cluster section), the ref_weight sweep, SFT and the main job; the batch-split check they share; the redaction of
secrets from a config that leaves the job."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_logitavg.algorithms.grpo import AGGREGATIONS, K1_REFUSED, KL_ESTIMATORS
from nemo_logitavg.models.scratch import ScratchModelConfig
from nemo_logitavg.ops.ref_weight import check_ref_weight
from nemo_logitavg.rewards.math_answer import GRADE_TIMEOUT
from nemo_logitavg.rewards.math_answer import STARTUP_TIMEOUT as GRADER_STARTUP_TIMEOUT
from nemo_logitavg.rollout.client import MAX_ATTEMPTS, MAX_BACKOFF, REQUEST_TIMEOUT

T = TypeVar("T")


def load_config(schema: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read ``path`` into the dataclass ``schema``, apply ``key=value`` overrides, return a typed object.

    Raises:
        ValueError: naming the file and key when a key is unknown (a key that moved: its new place, see
            ``MOVED_KEYS``), a value has the wrong type, or an override is malformed.
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


def config_as_dict(schema: type, path: str | Path, overrides: list[str] | None = None) -> dict:
    """``path`` with ``overrides``, checked against ``schema`` like ``load_config``, as plain containers for reports
    (the model card): required values not given stay ``"???"`` and interpolations stay unresolved (no secret from
    the environment is copied out)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides or [])))
    except OmegaConfBaseException as exc:
        raise ValueError(f"{path}: {_describe(exc)}") from None
    return OmegaConf.to_container(merged, resolve=False, throw_on_missing=False)  # type: ignore[return-value]


def redact_secrets(cfg: Mapping) -> dict:
    """A plain copy of a run config without its secret, the rollout token (replaced by ``"<redacted>"``; an
    interpolation such as ``${oc.env:...}`` names no secret and stays). For whatever leaves the job: the model
    card, the config uploaded to W&B."""
    out = json.loads(json.dumps(cfg, default=str))
    rollout = out.get("rollout") if isinstance(out, dict) else None
    token = rollout.get("token") if isinstance(rollout, dict) else None
    if isinstance(token, str) and not token.startswith("${"):
        rollout["token"] = "<redacted>"
    return out


# Keys that moved to another section: old key -> (new key, why). A config that still uses one is refused by name.
_UPDATE_NOT_ROLLOUTS = "it sizes the update's micro-batches, not the rollouts"
MOVED_KEYS = {
    "rollout.micro_batch_size": ("train.micro_batch_size", _UPDATE_NOT_ROLLOUTS),
    "rollout.max_tokens_per_micro_batch": ("train.max_tokens_per_micro_batch", _UPDATE_NOT_ROLLOUTS),
}


def moved_key(key: str | None) -> str | None:
    """``"<old> moved to <new> (<why>)"`` when ``key`` is one of ``MOVED_KEYS``, else None."""
    if key not in MOVED_KEYS:
        return None
    new, why = MOVED_KEYS[key]
    return f"{key} moved to {new} ({why})"


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    moved = moved_key(key)
    if moved:
        return moved
    message = getattr(exc, "msg", None) or str(exc).splitlines()[0]
    return f"key '{key}': {message}" if key else message


def check_batch_split(what: str, sequences: int, parts: Sequence[tuple[str, int | None]]) -> None:
    """Check that ``sequences`` split evenly into the product of ``parts`` (each a setting's name and value, e.g.
    ``("algorithm.mini_batches", 2)``); a value of None (not set) never splits. The one batch-divisibility check of
    the GRPO config, its cluster section, the trainer's micro-batch plan and SFT.

    Raises:
        ValueError: ``"<what> = <sequences> sequences must split over <name> (<value>) x ..."``.
    """
    product = 1
    for _, value in parts:
        product = 0 if value is None or product == 0 else product * value
    if product < 1 or sequences % product:
        named = " x ".join(f"{name} ({value})" for name, value in parts)
        raise ValueError(f"{what} = {sequences} sequences must split over {named}")


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
    beta: float = 0.0  # weight of the per-token KL term (kl_estimator), for the baseline
    kl_estimator: str = "k3"
    epochs: int = 1  # optimisation passes over each step's rollouts
    mini_batches: int = 1  # optimiser steps per epoch
    mask_truncated: bool = False  # drop completions cut at max_tokens from the loss
    temperature: float = 1.0
    top_p: float = 1.0
    # Asynchronous GRPO: the rollouts of up to this many later steps are sampled while a step trains, and a
    # completion sampled more than this many policy steps ago is dropped and regenerated. 0: synchronous.
    max_staleness: int = 0
    is_cap: float = 2.0  # truncation of the importance weight pi_prox / pi_behav (used when max_staleness > 0)


@dataclass
class RolloutSection:
    urls: list[str] = field(default_factory=list)  # running servers; empty: the recipe starts one
    token: str | None = None
    timeout: float = REQUEST_TIMEOUT  # seconds one rollout request may take (generation included)
    attempts: int = MAX_ATTEMPTS  # tries per request over all servers (the client's max_attempts)
    push_timeout: float = 600.0  # seconds a policy push may take to land in the servers
    prompts_per_step: int = 8
    max_tokens: int = 256
    push_bucket_mb: float | None = None  # policy push bucket (MiB); None: 1024 on GPUs, 128 on CPUs
    allow_dtype_mismatch: bool = False  # True: accept servers serving another dtype than model.dtype


@dataclass
class TrainSection:
    """The training update's micro-batches: how the actor's forward/backward passes split each mini-batch
    (trainer/batching.py, plan_micro_batches). Not the rollouts."""

    micro_batch_size: int = 4  # sequences per forward/backward micro-batch, padded to the step's longest
    # Set: micro-batches by token budget instead (rows x own longest sequence <= this; replaces micro_batch_size).
    max_tokens_per_micro_batch: int | None = None


@dataclass
class DataSection:
    train: str = MISSING  # prompt jsonl: {"prompt": ..., "answer": ..., "reward": "math" | "mcq" (optional)}
    test: str | None = None
    reward: str = "math"  # math | mcq, for records without a "reward" field (each record is graded by its own)
    reward_timeout: float = GRADE_TIMEOUT


@dataclass
class OptimSection:
    lr: float = 1e-6
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    warmup_steps: int = 0


@dataclass
class RunSection:
    dir: str = "runs/grpo"  # checkpoints, metrics.jsonl, TensorBoard events, the rollout server's log, policy_final/
    steps: int = 100
    seed: int = 1234
    checkpoint_every: int = 10
    keep_last: int = 2
    eval_every: int = 0
    wandb_project: str | None = None  # also log to Weights & Biases (WANDB_MODE=offline for no network)
    # Seconds the other ranks wait for rank 0's rollout, grading and push; None: GRPOConfig.wait_bound().
    wait_timeout: float | None = None


@dataclass
class ClusterSection:
    """The Slurm layout of a GPU run, read by launcher/common.sh through ``recipes/plan.py --shell``. One
    allocation: the first ``trainer_nodes`` hosts train, the next ``rollout_nodes`` serve rollouts."""

    gpus_per_node: int = 8
    trainer_nodes: int = 1  # Megatron ranks: trainer_nodes x gpus_per_node = TP x PP x DP
    rollout_nodes: int = 1
    rollout_tp: int = 8  # GPUs per rollout server; a server stays within one node
    rollout_max_seqs: int = 128  # sequences a server keeps in its KV cache at once (planned against memory)
    max_context: int = 4096  # prompt + response tokens a sequence may reach (activations, KV cache)
    rollout_port: int = 8000  # a node's k-th server listens on rollout_port + k
    rollout_engine: str = "vllm"  # vllm (GPUs; given rollout_tp and max_context) | torch
    server_args: list[str] = field(default_factory=list)  # further flags of nemo_logitavg.rollout.server
    gpu_memory_gib: float = 80.0  # H100 80GB

    @property
    def servers_per_node(self) -> int:
        return self.gpus_per_node // self.rollout_tp


@dataclass
class GRPOConfig:
    model: ModelSection = field(default_factory=ModelSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    cluster: ClusterSection | None = None  # None: one machine (torchrun, or the tiny launcher)

    def wait_bound(self) -> float:
        """Seconds rank 0 may take to roll out, grade and push one step, in the worst case (docs/design.md §7b).

        ``rollout.attempts x (rollout.timeout + the client's largest backoff)`` + the grading bound (every answer
        of the step graded one after another at ``data.reward_timeout``, after the grader's start-up) +
        ``rollout.push_timeout``. With ``algorithm.max_staleness > 0`` the rollout and grading terms count
        twice: rank 0 may wait for a prefetched step and then regenerate its stale completions.
        """
        r = self.rollout
        answers = r.prompts_per_step * self.algorithm.group_size
        grading = GRADER_STARTUP_TIMEOUT + answers * self.data.reward_timeout
        rollouts = 2 if self.algorithm.max_staleness > 0 else 1
        return rollouts * (r.attempts * (r.timeout + MAX_BACKOFF) + grading) + r.push_timeout

    def wait_timeout(self) -> float:
        """The waiting ranks' timeout in seconds: ``run.wait_timeout``, or ``wait_bound()`` when it is not set."""
        return self.wait_bound() if self.run.wait_timeout is None else float(self.run.wait_timeout)

    def validate(self) -> GRPOConfig:
        """Check ranges and names; raise ValueError naming the key."""
        a, r, t = self.algorithm, self.rollout, self.train
        check_ref_weight(a.ref_weight, "config key algorithm.ref_weight")
        checks = [
            (a.group_size >= 2, "algorithm.group_size", "must be >= 2 (advantages are relative to the group)"),
            (a.agg in AGGREGATIONS, "algorithm.agg", f"must be one of {', '.join(AGGREGATIONS)}"),
            (a.kl_estimator in KL_ESTIMATORS, "algorithm.kl_estimator",
             f"must be one of {', '.join(KL_ESTIMATORS)}" + (f" ({K1_REFUSED})" if a.kl_estimator == "k1" else "")),
            (a.beta >= 0.0, "algorithm.beta", "must be >= 0"),
            (a.temperature > 0.0, "algorithm.temperature", "must be > 0"),
            (0.0 < a.top_p <= 1.0, "algorithm.top_p", "must lie in (0, 1]"),
            (a.epochs >= 1, "algorithm.epochs", "must be >= 1"),
            (a.mini_batches >= 1, "algorithm.mini_batches", "must be >= 1"),
            (a.max_staleness >= 0, "algorithm.max_staleness", "must be >= 0 (0: synchronous)"),
            (math.isfinite(a.is_cap) and a.is_cap >= 1.0, "algorithm.is_cap",
             "must be >= 1 (an on-policy token keeps importance weight 1)"),
            (r.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1"),
            (r.max_tokens >= 1, "rollout.max_tokens", "must be >= 1"),
            (t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1"),
            (r.push_bucket_mb is None or r.push_bucket_mb > 0, "rollout.push_bucket_mb", "must be > 0 (or null)"),
            (r.timeout > 0, "rollout.timeout", "must be > 0"),
            (r.attempts >= 1, "rollout.attempts", "must be >= 1"),
            (r.push_timeout > 0, "rollout.push_timeout", "must be > 0"),
            (self.data.reward_timeout > 0, "data.reward_timeout", "must be > 0"),
            (self.run.wait_timeout is None or self.run.wait_timeout > 0, "run.wait_timeout", "must be > 0 (or unset)"),
            (t.max_tokens_per_micro_batch is None or t.max_tokens_per_micro_batch >= r.max_tokens,
             "train.max_tokens_per_micro_batch", f"must be >= rollout.max_tokens ({r.max_tokens})"),
            (self.model.dtype in ("float32", "bfloat16"), "model.dtype", "must be float32 or bfloat16"),
            (self.data.reward in ("math", "mcq"), "data.reward", "must be math or mcq"),
            (self.run.steps >= 1, "run.steps", "must be >= 1"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise ValueError(f"config key {key} {why}, got {_get(self, key)!r}")
        # A token budget replaces the fixed micro-batch size: the mini-batches need only split the step.
        split = [("algorithm.mini_batches", a.mini_batches)]
        if t.max_tokens_per_micro_batch is None:
            split.append(("train.micro_batch_size", t.micro_batch_size))
        check_batch_split("config: rollout.prompts_per_step x algorithm.group_size", r.prompts_per_step * a.group_size,
                          split)  # fmt: skip
        bound = self.wait_bound()
        if self.run.wait_timeout is not None and self.run.wait_timeout < bound:
            raise ValueError(
                f"config: run.wait_timeout = {self.run.wait_timeout:g} s could expire while rank 0 is still within "
                f"rollout.timeout ({r.timeout:g} s) x rollout.attempts ({r.attempts}) plus backoff, grading "
                f"(data.reward_timeout) and rollout.push_timeout ({r.push_timeout:g} s): worst case {bound:g} s; "
                "raise run.wait_timeout or unset it (it is then derived)"
            )
        if self.cluster is not None:
            self._validate_cluster()
        return self

    def _validate_cluster(self) -> None:
        c, m, t = self.cluster, self.model, self.train
        checks = [
            (c.gpus_per_node >= 1, "cluster.gpus_per_node", "must be >= 1"),
            (c.trainer_nodes >= 1, "cluster.trainer_nodes", "must be >= 1"),
            (c.rollout_nodes >= 1, "cluster.rollout_nodes", "must be >= 1 (rollout servers get nodes of their own)"),
            (c.rollout_tp >= 1 and c.gpus_per_node % c.rollout_tp == 0, "cluster.rollout_tp",
             f"must divide cluster.gpus_per_node ({c.gpus_per_node}): a server stays within one node"),
            (c.rollout_max_seqs >= 1, "cluster.rollout_max_seqs", "must be >= 1"),
            (c.max_context > self.rollout.max_tokens, "cluster.max_context",
             f"must exceed rollout.max_tokens ({self.rollout.max_tokens}): it holds the prompt too"),
            (t.max_tokens_per_micro_batch is None or t.max_tokens_per_micro_batch >= c.max_context - 1,
             "train.max_tokens_per_micro_batch",
             f"must hold a sequence of cluster.max_context ({c.max_context}) tokens, >= {c.max_context - 1}"),
            (1 <= c.rollout_port <= 65535 - c.gpus_per_node, "cluster.rollout_port", "must be a port number"),
            (c.rollout_engine in ("vllm", "torch"), "cluster.rollout_engine", "must be vllm or torch"),
        ]  # fmt: skip
        for ok, key, why in checks:
            if not ok:
                raise ValueError(f"config key {key} {why}, got {_get(self, key)!r}")
        gpus, model_parallel = c.trainer_nodes * c.gpus_per_node, m.tensor_parallel * m.pipeline_parallel
        if gpus % model_parallel:
            raise ValueError(
                f"config: cluster.trainer_nodes x cluster.gpus_per_node = {gpus} trainer GPUs must be a multiple of "
                f"model.tensor_parallel x model.pipeline_parallel = {model_parallel}"
            )
        split = [("data parallel of the cluster section", gpus // model_parallel)]
        if t.max_tokens_per_micro_batch is None:
            split.append(("train.micro_batch_size", t.micro_batch_size))
        per_mini = self.rollout.prompts_per_step * self.algorithm.group_size // self.algorithm.mini_batches
        mini = "config: a mini-batch (rollout.prompts_per_step x algorithm.group_size / algorithm.mini_batches)"
        check_batch_split(mini, per_mini, split)


def _get(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class SweepConfig:
    """A grid of GRPO runs over ``ref_weights`` x ``seeds``, everything else from ``base`` (group size, reward and
    budget held fixed, as the ablation needs). Run ``i`` of the grid (a Slurm array index) is ref_weight-major."""

    base: str = MISSING  # the GRPO config of every run (a path relative to the repository root)
    ref_weights: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    run_dir: str = "runs/sweep"  # run i writes run_dir/a{ref_weight}_seed{seed}
    overrides: list[str] = field(default_factory=list)  # key=value applied to every run

    def __len__(self) -> int:
        return len(self.ref_weights) * len(self.seeds)

    def run_overrides(self, index: int) -> list[str]:
        """The ``key=value`` overrides of run ``index`` (0 <= index < len(self))."""
        if not 0 <= index < len(self):
            raise ValueError(f"sweep index {index} is outside the grid of {len(self)} runs (0..{len(self) - 1})")
        a, seed = self.ref_weights[index // len(self.seeds)], self.seeds[index % len(self.seeds)]
        point = [f"algorithm.ref_weight={a}", f"run.seed={seed}", f"run.dir={self.run_dir}/a{a}_seed{seed}"]
        return [*self.overrides, *point]

    def load_run(self, index: int, overrides: list[str] | None = None, root: str | Path = ".") -> GRPOConfig:
        """Run ``index``'s GRPO config (``base`` read relative to ``root``), with ``overrides`` last, validated."""
        every = self.run_overrides(index) + list(overrides or [])
        return load_config(GRPOConfig, Path(root) / self.base, every).validate()

    def validate(self) -> SweepConfig:
        if not self.ref_weights or not self.seeds:
            raise ValueError("sweep: ref_weights and seeds must both be non-empty")
        if len(set(self.ref_weights)) != len(self.ref_weights) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"sweep: repeated ref_weights {self.ref_weights} or seeds {self.seeds}")
        for a in self.ref_weights:
            check_ref_weight(a, "sweep: every entry of ref_weights")
        return self


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


# ---------------------------------------------------------------------------------------------- main job schema


@dataclass
class ProblemsSection:
    count: int = 8000  # generated before duplicates are removed
    kinds: list[str] = field(default_factory=lambda: ["addition", "subtraction", "multiplication", "algebra"])
    test_fraction: float = 0.1  # held out by a hash of the problem text
    test_size: int = 300  # at most this many held-out problems are evaluated
    curve_size: int = 100  # held-out problems scored greedily during GRPO (accuracy against step)
    # SFT demonstrations are not all correct: this fraction of the algebra solutions (x + b = c) comes from a
    # careless teacher who moves b across without changing its sign (x = c + b). GRPO's reward can correct what
    # imitation learned; 0 gives clean data.
    teacher_error_rate: float = 0.0
    # This fraction of the problems is asked as four-option questions (MMLU format, a letter answer graded by
    # score_mcq, record source "arith_mcq") in the same data set, for SFT and GRPO alike; 0 keeps math only.
    mcq_fraction: float = 0.0
    seed: int = 0


@dataclass
class EvalSection:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # evaluation seeds (sampled mode)
    sampled_k: int = 4  # completions per problem and seed at temperature 1; greedy (the headline) runs once
    max_tokens: int = 64
    math_timeout: float = GRADE_TIMEOUT


@dataclass
class SweepSection:
    """An ablation over the averaging weight: ``methods.<method>`` is trained once per ref_weight (everything else,
    group size, reward and budget included, held fixed), as methods named ``<method>_a<ref_weight>``."""

    method: str = "logit_avg"
    ref_weights: list[float] = field(default_factory=list)


@dataclass
class JobConfig:
    """The main job (``configs/tiny_cpu.yaml``) and the reproduction job (``configs/paper_cpu.yaml``), run by
    ``nemo_logitavg.job``. ``sft`` and ``grpo`` hold keys of ``SFTConfig`` / ``GRPOConfig`` (paths are filled in by
    the job); ``methods`` maps a method name to its GRPO overrides."""

    dir: str = "runs/tiny_cpu"
    nproc: int = 2  # processes (cores) of the job: SFT runs on all of them, each GRPO run on nproc / concurrent_runs
    problems: ProblemsSection = field(default_factory=ProblemsSection)
    model: ScratchModelConfig = field(default_factory=ScratchModelConfig)
    model_seed: int = 0
    sft: dict[str, Any] = field(default_factory=dict)
    grpo: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, Any] = field(default_factory=dict)
    ref_weight_sweep: SweepSection | None = None  # set: methods.<method> once per ref_weight (the ablation)
    # Training seeds: every method is trained once per seed (run.seed = the seed, and with it the rollout seeds;
    # the SFT model is shared). Empty: one run per method with grpo.run.seed (the main job).
    seeds: list[int] = field(default_factory=list)
    concurrent_runs: int = 1  # GRPO runs trained at the same time, each with its own torchrun and rollout server
    baseline: str = "sft"  # the model every method is compared with (paired bootstrap)
    eval: EvalSection = field(default_factory=EvalSection)

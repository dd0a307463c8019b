"""The logit-averaging actor: a trainable policy and a frozen reference with the same parallel layout.

Both are megatron-core GPTModels split identically over TP and PP. Under pipeline parallelism each stage is one
``MixedStage`` module holding the policy's and the reference's layers of that stage; the activation passed
between stages is ``cat([h_pol, h_ref], -1)`` and the last stage averages the two models' vocab-parallel logits
in ``mixed_logprobs``. The policy alone is wrapped in megatron's DDP and given to the optimiser; the reference
is in eval mode, has ``requires_grad=False``, runs under ``torch.no_grad()`` and never leaves its device.
Both models live on ``rank_device()``; micro-batches may come from the host and are moved there in the forward
step, so losses, metrics and the returned log-probs are on that device too.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nemo_logitavg.models.builder import LlamaConfig, build_gpt_model
from nemo_logitavg.models.conversion.loading import load_hf_into_mcore
from nemo_logitavg.ops import mixed_logprobs
from nemo_logitavg.parallel import rank_device

# loss_fn(logprobs [b, s] float32, entropy [b, s] float32, micro_batch) -> (scalar loss, metrics)
LossFn = Callable[[torch.Tensor, torch.Tensor, dict], tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class ActorConfig:
    ref_weight: float = 0.5
    temperature: float = 1.0
    params_dtype: torch.dtype = torch.float32
    logprob_chunk_size: int | None = None  # tokens per chunk of the fused log-prob (None: automatic)
    reference_logprobs: bool = False  # also compute log pi_ref of the targets (the KL-GRPO baseline)
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0
    lr_warmup_steps: int = 0  # update k (from 0) uses lr * min(1, k / lr_warmup_steps): megatron's linear warm-up
    lr_decay_steps: int = 0  # > 0: cosine decay from lr to min_lr, ending at this update (SFT from scratch)
    min_lr: float = 0.0


def check_same_layout(policy: LlamaConfig, reference: LlamaConfig) -> None:
    """The two models must share vocabulary and layer structure, or their shards would not line up.

    Raises:
        ValueError: naming every field that differs.
    """
    fields = ("vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads")
    diff = [f"{f}: policy {getattr(policy, f)} vs reference {getattr(reference, f)}" for f in fields
            if getattr(policy, f) != getattr(reference, f)]  # fmt: skip
    if diff:
        raise ValueError("policy and reference must have the same vocabulary and layout; " + "; ".join(diff))


def _lr_scheduler(optimizer: Any, cfg: ActorConfig) -> Any:
    """Megatron's LR / weight-decay schedule: linear warm-up over ``lr_warmup_steps``, then constant ``lr``, or
    with ``lr_decay_steps`` a cosine decay to ``min_lr``.

    It also applies megatron's per-group weight-decay multipliers (no decay on norms and biases).
    """
    # megatron-core is heavy (~3 s): the job imports this module (through checkpointing) without it
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr if cfg.lr_decay_steps else cfg.lr,
        lr_warmup_steps=cfg.lr_warmup_steps,
        lr_decay_steps=max(cfg.lr_decay_steps, cfg.lr_warmup_steps + 1),
        lr_decay_style="cosine" if cfg.lr_decay_steps else "constant",
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )


class MixedStage(torch.nn.Module):
    """One pipeline stage: the policy's and the reference's layers of that stage, run side by side.

    The schedule reads everything from ``self.config``: a shallow copy of the policy's with ``hidden_size``
    doubled (the p2p tensor carries both models' hidden states), plus the finalize / no-sync hooks.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        reference: torch.nn.Module | None,
        gpt_policy: torch.nn.Module,
        actor_cfg: ActorConfig,
        true_vocab_size: int,
        tp_group: Any,
    ) -> None:
        super().__init__()
        self.policy = policy  # the DDP-wrapped policy GPTModel
        self.reference = reference
        self.hidden_size = gpt_policy.config.hidden_size
        self.config = copy.copy(gpt_policy.config)
        if reference is not None:
            self.config.hidden_size = 2 * self.hidden_size
        self.model_type = gpt_policy.model_type
        self.pre_process = gpt_policy.pre_process
        self.post_process = gpt_policy.post_process
        self.vp_stage = getattr(gpt_policy, "vp_stage", None)
        self._gpt_policy = [gpt_policy]  # a list: not registered as a submodule twice
        self.actor_cfg = actor_cfg
        self.true_vocab_size = true_vocab_size
        self.tp_group = tp_group

    def set_input_tensor(self, input_tensor: torch.Tensor | list | None) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        if self.reference is None:
            self._gpt_policy[0].set_input_tensor(input_tensor)
            return
        if input_tensor is None:
            self._gpt_policy[0].set_input_tensor(None)
            self.reference.set_input_tensor(None)
            return
        h_pol, h_ref = input_tensor.split(self.hidden_size, dim=-1)
        self._gpt_policy[0].set_input_tensor(h_pol)
        self.reference.set_input_tensor(h_ref.detach())

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Not the last stage: ``[s, b, 2h]`` hidden states. Last stage: ``(logprobs, entropy[, ref_logprobs])``,
        each ``[b, s]`` float32 (``ref_logprobs`` = log pi_ref when ``reference_logprobs`` is set)."""
        policy_out = self.policy(input_ids, position_ids, None)
        if self.reference is None:  # policy alone: pi_mix with a = 0 is the policy's own softmax
            ref_out, ref_weight = policy_out, 0.0
        else:
            with torch.no_grad():
                ref_out = self.reference(input_ids, position_ids, None)
            ref_weight = self.actor_cfg.ref_weight
        if not self.post_process:
            return policy_out if self.reference is None else torch.cat([policy_out, ref_out], dim=-1)
        logprobs, entropy = mixed_logprobs(
            policy_out,
            ref_out,
            targets,
            ref_weight,
            self.actor_cfg.temperature,
            tp_group=self.tp_group,
            chunk_size=self.actor_cfg.logprob_chunk_size,
            return_entropy=True,
            true_vocab_size=self.true_vocab_size,
        )
        if not self.actor_cfg.reference_logprobs or self.reference is None:
            return logprobs, entropy
        with torch.no_grad():  # log pi_ref: the reference's own softmax (a = 0 on the reference's logits)
            ref_logprobs = mixed_logprobs(
                ref_out, ref_out, targets, 0.0, self.actor_cfg.temperature, tp_group=self.tp_group,
                chunk_size=self.actor_cfg.logprob_chunk_size, true_vocab_size=self.true_vocab_size,
            )  # fmt: skip
        return logprobs, entropy, ref_logprobs


class LogitAveragingActor:
    """Policy + frozen reference on this rank's TP/PP shard, with the optimiser over the policy only.

    Build with ``LogitAveragingActor(policy_cfg, reference_cfg, actor_cfg)`` after ``init_parallel``; load
    weights with ``load_hf`` (or a checkpoint). ``reference_cfg=None`` builds the policy alone (SFT, and the
    baseline of the benchmarks): its log-probs are the policy's own. ``forward_backward`` runs megatron's schedule over
    micro-batches of ``{"input_ids", "position_ids", "targets", ...}`` (each ``[b, s]``; ``b`` and ``s`` may differ
    between micro-batches: the pipeline stages then exchange shapes, megatron's ``variable_seq_lengths``).
    """

    def __init__(self, policy_cfg: LlamaConfig, reference_cfg: LlamaConfig | None, actor_cfg: ActorConfig) -> None:
        # megatron-core is heavy (~3 s): the job imports this module (through checkpointing) without it
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        if reference_cfg is not None:
            check_same_layout(policy_cfg, reference_cfg)
        if not 0.0 <= actor_cfg.ref_weight <= 1.0:
            raise ValueError(f"ref_weight must lie in [0, 1], got {actor_cfg.ref_weight}")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if policy_cfg.num_hidden_layers % pp:
            raise ValueError(
                f"pipeline_parallel_size={pp} does not divide num_hidden_layers={policy_cfg.num_hidden_layers}"
            )
        self.policy_cfg, self.reference_cfg, self.cfg = policy_cfg, reference_cfg, actor_cfg
        self.device = rank_device()  # where both models, the batches and the losses live
        stage = {
            "tensor_parallel_size": tp,
            "pipeline_parallel_size": pp,
            "params_dtype": actor_cfg.params_dtype,
            "pre_process": parallel_state.is_pipeline_first_stage(),
            "post_process": parallel_state.is_pipeline_last_stage(),
        }
        self.gpt_policy = build_gpt_model(policy_cfg, **stage)
        self.reference = None
        if reference_cfg is not None:
            self.reference = build_gpt_model(reference_cfg, **stage).eval().requires_grad_(False)

        use_gpu = torch.cuda.is_available()
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=use_gpu,  # plain optimiser on CPU: its checkpoints are reliable there
            overlap_grad_reduce=False,
        )
        # DDP allocates its gradient buffers beside the parameters: the policy is on self.device already.
        self.policy = DistributedDataParallel(self.gpt_policy.config, ddp_config, self.gpt_policy)
        self.stage = MixedStage(
            self.policy,
            self.reference,
            self.gpt_policy,
            actor_cfg,
            policy_cfg.vocab_size,
            parallel_state.get_tensor_model_parallel_group(),
        )
        config = self.stage.config
        config.finalize_model_grads_func = lambda _model, num_tokens=None, **kw: finalize_model_grads(
            [self.policy], num_tokens, **kw
        )
        config.no_sync_func = self.policy.no_sync
        config.pipeline_dtype = actor_cfg.params_dtype
        config.batch_p2p_comm = use_gpu  # gloo's batched p2p is unreliable (docs/design.md §5)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=actor_cfg.lr,
                min_lr=actor_cfg.min_lr if actor_cfg.lr_decay_steps else actor_cfg.lr,
                weight_decay=actor_cfg.weight_decay,
                adam_beta1=actor_cfg.adam_beta1,
                adam_beta2=actor_cfg.adam_beta2,
                clip_grad=actor_cfg.clip_grad,
                bf16=actor_cfg.params_dtype == torch.bfloat16,
                params_dtype=actor_cfg.params_dtype,
                use_distributed_optimizer=use_gpu,
            ),
            [self.policy],
        )
        self.scheduler = _lr_scheduler(self.optimizer, actor_cfg)
        self.skipped_steps = 0  # updates skipped for a non-finite gradient
        self.reference_dir: str | None = None  # set by load_hf; checkpoints record it (the reference is not saved)

    def forward_backward(
        self,
        micro_batches: Sequence[dict],
        loss_fn: LossFn | None = None,
        forward_only: bool = False,
    ) -> list[dict]:
        """Run the pipeline schedule over ``micro_batches``; return per-micro-batch results (last stage only).

        With ``loss_fn``, its loss is backpropagated into the policy as given (the actor undoes megatron's
        division by the number of micro-batches, so ``loss_fn`` normalises over the whole step itself). The
        results hold ``logprobs`` and ``entropy`` (``[b, s]``, detached) and the metrics ``loss_fn`` returned;
        they are empty on stages other than the last. Tensors of ``micro_batches`` may be on any device: each
        micro-batch is moved to ``self.device`` when the schedule takes it, and ``loss_fn`` sees it there; the
        results are on ``self.device``.
        """
        # megatron-core is heavy (~3 s): the job imports this module (through checkpointing) without it
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not micro_batches:
            raise ValueError("forward_backward needs at least one micro-batch")
        shapes = {tuple(batch["input_ids"].shape) for batch in micro_batches}
        for i, batch in enumerate(micro_batches):
            for key in ("position_ids", "targets"):
                if batch[key].shape != batch["input_ids"].shape:
                    raise ValueError(f"micro-batch {i}: {key} has shape {tuple(batch[key].shape)}, "
                                     f"input_ids {tuple(batch['input_ids'].shape)}")  # fmt: skip
        shape = max(shapes)
        # Micro-batches of different [b, s] (token-budget batching): the stages exchange each one's shape first.
        self.stage.config.variable_seq_lengths = len(shapes) > 1
        num_micro = len(micro_batches)
        dp_size = parallel_state.get_data_parallel_world_size()
        if forward_only:
            self.stage.eval()
        else:
            self.stage.train()
            if self.reference is not None:
                self.reference.eval()

        device = self.device

        def forward_step(data_iterator, model):
            # One micro-batch on the device at a time (the caller's batch may live on the host).
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in next(data_iterator).items()}  # fmt: skip
            output = model(batch["input_ids"], batch["position_ids"], batch["targets"])

            def loss_func(out):
                logprobs, entropy = out[0], out[1]
                result = {"logprobs": logprobs.detach(), "entropy": entropy}
                if len(out) == 3:
                    batch["ref_logprobs"] = result["ref_logprobs"] = out[2]
                if loss_fn is None:
                    return logprobs.sum() * 0.0, result
                loss, metrics = loss_fn(logprobs, entropy, batch)
                result.update(metrics)
                # Megatron divides by num_micro in place and DDP averages gradients over DP ranks: undo both,
                # so that loss_fn's own normalisation (over the whole step) is the one that counts.
                return loss * (num_micro * dp_size), result

            return output, loss_func

        context = torch.no_grad() if forward_only else torch.enable_grad()
        with context:
            if not forward_only:
                self.policy.zero_grad_buffer()
                self.optimizer.zero_grad()
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(micro_batches),
                model=[self.stage],
                num_microbatches=num_micro,
                seq_length=shape[1],
                micro_batch_size=shape[0],
                forward_only=forward_only,
            )

    def optimizer_step(self) -> tuple[bool, float]:
        """Apply the policy update; returns (update applied, gradient norm before clipping).

        A NaN or Inf anywhere in the policy's gradients (on any rank) skips the update: the gradients are
        dropped, ``skipped_steps`` counts it and a warning says so, so the weights never become NaN.
        """
        flag = self._all_finite(p.main_grad for p in self.gpt_policy.parameters() if hasattr(p, "main_grad"))
        if flag.item() < 1.0:
            self.skipped_steps += 1
            self.policy.zero_grad_buffer()
            self.optimizer.zero_grad()
            warnings.warn(
                f"non-finite policy gradient: update skipped ({self.skipped_steps} skipped so far)", stacklevel=2
            )
            return False, float("nan")
        success, grad_norm, _ = self.optimizer.step()
        if success:
            self.scheduler.step(1)
        return bool(success), float(grad_norm) if grad_norm is not None else float("nan")

    def weights_finite(self) -> bool:
        """True when every policy weight on every rank is finite (a collective)."""
        return self._all_finite(self.gpt_policy.parameters()).item() == 1.0

    def _all_finite(self, tensors: Any) -> torch.Tensor:
        """``[1]`` float32 on ``self.device``: 1.0 when every tensor on every rank is finite, else 0.0.

        The flag stays on the device with the tensors (one host sync, at the caller's ``.item()``) and is
        reduced over the default group: NCCL for a CUDA flag, gloo for a CPU one.
        """
        flag = torch.ones(1, device=self.device)
        for tensor in tensors:
            flag.mul_(torch.isfinite(tensor).all())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag

    def load_hf(self, policy_dir: str, reference_dir: str | None) -> None:
        """Load both models' shards from Hugging Face directories (checked against the configs)."""
        load_hf_into_mcore(self.gpt_policy, policy_dir)
        if self.reference is not None:
            if reference_dir is None:
                raise ValueError("this actor has a reference model: load_hf needs reference_dir")
            load_hf_into_mcore(self.reference, reference_dir)
            self.reference_dir = str(reference_dir)
        # The optimiser keeps its own float32 copies only under mixed precision; reload them.
        if hasattr(self.optimizer, "reload_model_params"):
            self.optimizer.reload_model_params()

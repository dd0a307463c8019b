"""Log-probabilities under pi_mix, the logit average of a trainable policy and a frozen reference.

    m        = (1 - a) * z_pol + a * z_ref
    pi_mix   = softmax(m / T)
    log pi_mix(y) = m_y / T - logsumexp(m / T)

The vocabulary may be split over a tensor-parallel group (each rank holds the same number of contiguous
columns of both models' logits). The full-vocabulary softmax is never gathered: per chunk of tokens, one
all-reduce(MAX) of the local max and one all-reduce(SUM) carrying the local sum of exp and the target logit
(owned by exactly one rank). The gradient with respect to the policy logits,

    d log pi_mix(y) / d z_pol = (1 - a) / T * (onehot(y) - pi_mix),

is written chunk by chunk during the forward into one buffer of the logits' shape and dtype (the memory the
gradient needs anyway), so the backward is a per-token scale with no communication and the float32 softmax of
the whole micro-batch never exists at once. The reference receives no gradient.

Precision: the gradient is formed in float32 (float64 for float64 logits), with 1 - p_y taken as the sum of
the other columns' probabilities (no cancellation when p_y is near 1), and rounded to the logits' dtype once;
a bf16 d log pi_mix / d z_pol is within one bf16 rounding (relative 2^-8) of the float64 value. The backward
multiplies by the upstream gradient in float32 and rounds once more (bf16 holds the product), so a bf16
gradient of a weighted loss is within two roundings elementwise; keeping it to one would need a float32
buffer (twice the memory) or a second pass over both models' logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_logitavg.ops.ref_weight import check_ref_weight

# Float32 elements of one chunk's working buffer when `chunk_size` is not given (64 MiB): bounds peak memory
# while keeping the per-chunk costs few (each chunk runs ~6 parallel regions / kernels and 2 all-reduces; on
# a loaded 2-core CPU those, not the arithmetic, made 16 MiB chunks 1.4-2x slower, BENCHMARKS.md).
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 for every lower precision; float64 inputs keep float64 so that gradcheck is meaningful.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _validate(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    target: torch.Tensor,
    ref_weight: float,
    temperature: float,
    chunk_size: int | None,
) -> None:
    for name, logits in (("policy_logits", policy_logits), ("ref_logits", ref_logits)):
        if not torch.is_floating_point(logits):
            raise ValueError(f"mixed_logprobs: {name} must be a floating-point tensor, got {logits.dtype}")
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(
            "mixed_logprobs: policy_logits and ref_logits must have the same shape (the same vocabulary "
            f"shard of the same tokens), got {tuple(policy_logits.shape)} and {tuple(ref_logits.shape)}"
        )
    if policy_logits.dim() < 1 or policy_logits.shape[-1] == 0:
        raise ValueError(
            f"mixed_logprobs: logits need a non-empty vocabulary dimension, got {tuple(policy_logits.shape)}"
        )
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"mixed_logprobs: target must hold integer token ids, got {target.dtype}")
    if tuple(target.shape) != tuple(policy_logits.shape[:-1]):
        raise ValueError(
            "mixed_logprobs: target shape must equal the logits' shape without the vocabulary dimension, "
            f"got target {tuple(target.shape)} and logits {tuple(policy_logits.shape)}"
        )
    check_ref_weight(ref_weight, "mixed_logprobs: ref_weight")
    if not float(temperature) > 0.0:
        raise ValueError(f"mixed_logprobs: temperature must be > 0, got {temperature}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"mixed_logprobs: chunk_size must be a positive number of tokens, got {chunk_size}")


def _true_vocab(true_vocab_size: int | None, tp_size: int, vocab_local: int) -> int:
    """The vocabulary without Megatron's padding: ``true_vocab_size``, else all the columns the shards tile."""
    vocab_global = tp_size * vocab_local
    vocab_true = vocab_global if true_vocab_size is None else int(true_vocab_size)
    if not 0 < vocab_true <= vocab_global:
        raise ValueError(
            f"mixed_logprobs: true_vocab_size={true_vocab_size} must lie in (0, {vocab_global}] "
            f"(the vocabulary the TP group's shards tile: {tp_size} x {vocab_local})"
        )
    return vocab_true


def _check_target_ids(tgt: torch.Tensor, vocab_true: int) -> None:
    if tgt.numel() and (tgt.min() < 0 or tgt.max() >= vocab_true):
        bad = tgt[(tgt < 0) | (tgt >= vocab_true)][0].item()
        raise ValueError(f"mixed_logprobs: target holds token id {bad}, outside the vocabulary [0, {vocab_true})")


def _mix_into(m: torch.Tensor, pol: torch.Tensor, ref: torch.Tensor, a: float, inv_t: float, pad_from: int) -> None:
    """``m`` (the compute dtype) <- ((1 - a) * pol + a * ref) / T, with the padding columns from ``pad_from`` on at
    -inf; the inputs are never written."""
    if pol.dtype == m.dtype:
        torch.lerp(pol, ref, a, out=m)  # (1 - a) * pol + a * ref
    else:
        m.copy_(pol).mul_(1.0 - a).add_(ref, alpha=a)
    if inv_t != 1.0:
        m.mul_(inv_t)
    if pad_from < m.shape[1]:
        m[:, pad_from:] = float("-inf")


def _max_checking_shards(row_max: torch.Tensor, vocab_local: int, tp_group: dist.ProcessGroup) -> torch.Tensor:
    """The all-reduced row maxima; the shard sizes ride along with this first MAX and must be equal (equal sizes
    iff max(V) == -max(-V))."""
    sizes = torch.tensor([vocab_local, -vocab_local], dtype=row_max.dtype, device=row_max.device)
    packed = torch.cat([row_max, sizes])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=tp_group)
    if packed[-2].item() != -packed[-1].item():
        raise ValueError(
            "mixed_logprobs: the tensor-parallel ranks hold vocabulary shards of different "
            f"sizes (between {int(-packed[-1].item())} and {int(packed[-2].item())} columns); "
            "the shards must tile the vocabulary in equal contiguous pieces"
        )
    return packed[: row_max.shape[0]]


def _write_grad(
    grad_rows: torch.Tensor,
    e: torch.Tensor,
    grad_scale: float,
    sum_exp: torch.Tensor,
    sum_rest: torch.Tensor,
    rows_idx: torch.Tensor,
    cols_idx: torch.Tensor,
) -> None:
    """grad = (1 - a) / T * (onehot(y) - p), with p = e / S, in the compute dtype (``e``'s, whose target columns
    are 0), then rounded to the logits' dtype once (a bf16 buffer written as -s*p and then += s would cancel
    1 - p_y). ``e`` is overwritten when ``grad_rows`` has another dtype."""
    out = grad_rows if grad_rows.dtype == e.dtype else e
    torch.mul(e, (-grad_scale / sum_exp).unsqueeze(1), out=out)
    out[rows_idx, cols_idx] = (grad_scale * sum_rest / sum_exp)[rows_idx].to(out.dtype)
    if out is e:
        grad_rows.copy_(e)


class _MixedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        policy_logits: torch.Tensor,
        ref_logits: torch.Tensor,
        target: torch.Tensor,
        ref_weight: float,
        temperature: float,
        tp_group: dist.ProcessGroup | None,
        chunk_size: int | None,
        return_entropy: bool,
        true_vocab_size: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lead_shape = policy_logits.shape[:-1]
        vocab_local = policy_logits.shape[-1]
        pol = policy_logits.reshape(-1, vocab_local)
        ref = ref_logits.reshape(-1, vocab_local)
        tgt = target.reshape(-1)
        num_tokens = pol.shape[0]
        cdtype = _compute_dtype(policy_logits.dtype)
        device = policy_logits.device

        tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
        tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
        distributed = tp_size > 1
        vocab_start = tp_rank * vocab_local
        vocab_true = _true_vocab(true_vocab_size, tp_size, vocab_local)
        _check_target_ids(tgt, vocab_true)
        # Columns of this shard at or beyond the true vocabulary (Megatron's padding) are excluded.
        pad_from = min(max(vocab_true - vocab_start, 0), vocab_local)

        a = float(ref_weight)
        inv_t = 1.0 / float(temperature)
        need_grad = ctx.needs_input_grad[0]
        grad_buf = torch.empty_like(pol) if need_grad else None
        logprobs = torch.empty(num_tokens, dtype=cdtype, device=device)
        entropy = torch.empty(num_tokens if return_entropy else 0, dtype=cdtype, device=device)

        if chunk_size is None:
            chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // vocab_local)
        grad_scale = (1.0 - a) * inv_t
        shard_checked = not distributed

        chunk_buf = torch.empty(min(chunk_size, num_tokens), vocab_local, dtype=cdtype, device=device)
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            rows = end - start
            # m / T in the compute dtype, in one reused buffer; the inputs are never written.
            m = chunk_buf[:rows]
            _mix_into(m, pol[start:end], ref[start:end], a, inv_t, pad_from)

            local_t = tgt[start:end] - vocab_start
            owned = (local_t >= 0) & (local_t < vocab_local)
            local_t = torch.where(owned, local_t, torch.zeros_like(local_t))
            target_logit = torch.where(owned, m.gather(1, local_t.unsqueeze(1)).squeeze(1), 0.0)

            row_max = m.amax(dim=1)
            if distributed:
                if not shard_checked:
                    row_max = _max_checking_shards(row_max, vocab_local, tp_group)
                    shard_checked = True
                else:
                    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
            # A shard that is all padding has row_max = -inf locally but not after the all-reduce.

            m.sub_(row_max.unsqueeze(1))  # m <- m - max (<= 0)
            rows_idx = torch.arange(rows, device=device)[owned]
            cols_idx = local_t[owned]
            if return_entropy:
                # H = log S - sum(e * (m - max)) / S with e = exp(m - max), S = sum(e).
                e = torch.exp(m)
                weighted = torch.where(e > 0, e * m, 0.0)  # padded columns: 0 * -inf
                m = e
            else:
                m.exp_()
            # The target's column is summed apart: S_rest = sum of e over the other columns gives
            # 1 - p_y = S_rest / S without the cancellation of 1 - p_y when p_y is near 1.
            m[rows_idx, cols_idx] = 0.0
            parts = [m.sum(dim=1), target_logit]
            if return_entropy:
                parts.append(weighted.sum(dim=1))
            sums = torch.stack(parts)
            if distributed:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
            target_logit = sums[1]
            sum_rest = sums[0]
            sum_exp = sum_rest + torch.exp(target_logit - row_max)
            log_z = torch.log(sum_exp) + row_max  # logsumexp(m / T)
            logprobs[start:end] = target_logit - log_z
            if return_entropy:
                entropy[start:end] = torch.log(sum_exp) - sums[2] / sum_exp

            if need_grad:
                _write_grad(grad_buf[start:end], m, grad_scale, sum_exp, sum_rest, rows_idx, cols_idx)

        # Kept as an attribute rather than through save_for_backward: the backward scales it in place.
        ctx.grad_buf = grad_buf
        ctx.chunk_size = chunk_size
        ctx.logits_shape = policy_logits.shape
        ctx.mark_non_differentiable(entropy)
        return logprobs.reshape(lead_shape), entropy.reshape(lead_shape if return_entropy else (0,))

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor, _grad_entropy: torch.Tensor):  # type: ignore[override]
        grad_buf = ctx.grad_buf
        if grad_buf is None:
            raise RuntimeError(
                "mixed_logprobs: a second backward through the same graph is only supported for float64 "
                "logits; lower precisions scale the saved gradient in place to keep peak memory at one "
                "gradient (call mixed_logprobs again instead of retain_graph=True)"
            )
        # The upstream gradient stays in float32 (or float64): a lower-precision buffer is multiplied in the
        # wider dtype and rounded once, instead of also rounding the scale.
        scale = grad_logprobs.reshape(-1, 1).to(_compute_dtype(grad_buf.dtype))
        if grad_buf.dtype == torch.float64:
            # The verification dtype keeps its buffer so that repeated backward (gradcheck) works.
            grad = grad_buf * scale
        elif grad_buf.dtype == scale.dtype:
            grad = grad_buf.mul_(scale)
            ctx.grad_buf = None
        else:
            # Through one float32 chunk buffer: an in-place bf16 * float32 product would allocate float32
            # temporaries of its operand's size (twice the gradient's memory for the whole buffer at once).
            work = torch.empty(min(ctx.chunk_size, grad_buf.shape[0]), grad_buf.shape[1], dtype=scale.dtype,
                               device=grad_buf.device)  # fmt: skip
            for start in range(0, grad_buf.shape[0], ctx.chunk_size):
                rows = grad_buf[start : start + ctx.chunk_size]
                tmp = work[: rows.shape[0]]
                torch.mul(tmp.copy_(rows), scale[start : start + ctx.chunk_size], out=tmp)
                rows.copy_(tmp)
            grad = grad_buf
            ctx.grad_buf = None
        grad = grad.reshape(ctx.logits_shape)
        return grad, None, None, None, None, None, None, None, None


def mixed_logprobs(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    target: torch.Tensor,
    ref_weight: float,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    true_vocab_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi_mix(target) with pi_mix = softmax(((1 - ref_weight) * policy + ref_weight * ref) / temperature).

    Args:
        policy_logits: ``[..., V_local]`` this rank's vocabulary shard of the trainable policy's logits, any
            float dtype. Rank r of ``tp_group`` holds global columns ``[r * V_local, (r + 1) * V_local)``.
        ref_logits: ``[..., V_local]`` the frozen reference's logits, same shape and sharding. Never
            receives a gradient.
        target: integer ``[...]`` global vocabulary ids.
        ref_weight: the reference's weight ``a`` in [0, 1]; 0 is the policy alone, 1 gives zero gradient.
        temperature: ``T > 0``.
        tp_group: the tensor-parallel group the vocabulary is split over; ``None`` or size 1 is one device.
        chunk_size: tokens processed at once (bounds the float32 working memory); default picks about 16M
            logits per chunk.
        return_entropy: also return the entropy of pi_mix per token (a metric: no gradient).
        true_vocab_size: columns at or beyond this global id (vocabulary padding) are excluded.

    Returns:
        ``[...]`` float32 log pi_mix(target) (float64 for float64 logits), differentiable with respect to
        ``policy_logits`` only; with ``return_entropy``, a tuple ``(logprobs, entropy)``.

    Raises:
        ValueError: on mismatched shapes, non-float logits, a target outside the vocabulary, ``ref_weight``
            outside [0, 1], ``temperature <= 0``, or TP shards of unequal size.
    """
    _validate(policy_logits, ref_logits, target, ref_weight, temperature, chunk_size)
    logprobs, entropy = _MixedLogprobs.apply(
        policy_logits,
        ref_logits.detach(),
        target,
        float(ref_weight),
        float(temperature),
        tp_group,
        None if chunk_size is None else int(chunk_size),
        bool(return_entropy),
        true_vocab_size,
    )
    return (logprobs, entropy) if return_entropy else logprobs

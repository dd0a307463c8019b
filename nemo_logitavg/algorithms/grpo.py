"""GRPO on pi_mix as pure torch functions: group advantages, the clipped policy loss, and the KL baseline.

docs/design.md §1 and §7 are the contract:

    A_i      = (r_i - mean(r_group)) / (std(r_group) + eps)      std unbiased (torch.std's default)
    rho_t    = exp(log pi_new(y_t) - log pi_old(y_t))
    loss_t   = -min(rho_t * A, clip(rho_t, 1 - clip_low, 1 + clip_high) * A)

aggregated over the completion tokens by one of ``AGGREGATIONS``.

Bounded-staleness asynchronous GRPO (``algorithm.max_staleness = k >= 1``) trains on completions sampled up to
k policy steps ago. Its estimator is the decoupled PPO objective (Hilton et al. 2022, "Batch size-invariance for
policy optimization"; as AReaL), with three policies per token:

    behaviour  log pi_behav(y_t)   the rollout's log pi_mix, returned by the server that sampled (weights of step
                                   t - d, d <= k, its own completion's ``policy_step``)
    proximal   log pi_prox(y_t)    log pi_mix at the current weights before the update (the old-log-prob pass;
                                   with epochs = mini_batches = 1 the update forward's own log-probs, detached)
    current    log pi(y_t)         the differentiable log pi_mix being optimised

    w_t      = min(exp(log pi_prox(y_t) - log pi_behav(y_t)), is_cap)       truncated importance weight, detached
    rho_t    = exp(log pi(y_t) - log pi_prox(y_t))
    loss_t   = -w_t * min(rho_t * A, clip(rho_t, 1 - clip_low, 1 + clip_high) * A)

aggregated as above. The weight corrects for sampling from pi_behav instead of pi_prox; the clip keeps the update
within a trust region around pi_prox (not around the stale behaviour policy, so staleness does not shrink the
step); truncation at ``is_cap`` (default 2, >= 1) bounds the variance (Espeholt et al. 2018, V-trace).
With ``max_staleness = 0`` there is no weight: the loss is the synchronous one above, bit for bit (and with
identical behaviour and proximal log-probs ``w_t = exp(0) = 1`` exactly, so the two agree).

The log-probs are whatever policy is being
optimised (log pi_mix from ``nemo_logitavg.ops.mixed_logprobs``; with ``ref_weight = 0`` that is the policy
alone, and the KL baseline adds ``beta * aggregate(kl_penalty(...), ...)``).

Shapes: ``B`` completions (prompts x group_size, grouped consecutively), ``T`` completion tokens (padded).
Computation is float32 for every lower-precision input; float64 inputs stay float64 (as in
``mixed_logprobs``, so that float64 checks stay meaningful).

Nothing here synchronises with the device except argument checks on Python numbers and ``group_advantages``
(rewards are a handful of numbers), so ``policy_loss`` is safe to call per micro-batch on a GPU.
"""

from __future__ import annotations

import math

import torch

AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# The per-token KL estimators usable as a loss term; k1 is refused (see kl_penalty).
KL_ESTIMATORS: tuple[str, ...] = ("k2", "k3")
K1_REFUSED = (
    "k1 = log pi_pol(y) - log pi_ref(y) is refused as a loss: its expected gradient, E_pi_pol[grad log pi_pol(y)], "
    "is zero, so it would regularise nothing"
)

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "aggregate",
    "group_advantages",
    "kl_penalty",
    "policy_loss",
]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # bf16/fp16 would lose the ratio's precision; float64 is kept so that float64 references can be exact.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_tensor(name: str, fn: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_float_tensor(name: str, fn: str, value: object) -> torch.Tensor:
    tensor = _check_tensor(name, fn, value)
    if not torch.is_floating_point(tensor):
        raise ValueError(f"{fn}: {name} must be a floating-point tensor, got {tensor.dtype}")
    return tensor


def _as_bool_mask(mask: torch.Tensor, shape: torch.Size, fn: str) -> torch.Tensor:
    _check_tensor("mask", fn, mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{fn}: mask must have shape {tuple(shape)} [B, T], got {tuple(mask.shape)}")
    if mask.dtype.is_complex:
        raise ValueError(f"{fn}: mask must be bool or 0/1, got {mask.dtype}")
    # A 0/1 mask of any real dtype: nonzero means "this token counts".
    return mask if mask.dtype == torch.bool else mask != 0


def _check_agg(agg: str, fn: str, num_tokens: object, max_response_length: object) -> None:
    if agg not in AGGREGATIONS:
        raise ValueError(f"{fn}: unknown agg {agg!r}; valid names are {', '.join(AGGREGATIONS)}")
    if num_tokens is not None:
        if isinstance(num_tokens, torch.Tensor):
            if num_tokens.numel() != 1:
                raise ValueError(f"{fn}: num_tokens must be a single number, got shape {tuple(num_tokens.shape)}")
        elif isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, float)):
            raise ValueError(f"{fn}: num_tokens must be a positive number, got {num_tokens!r}")
        elif not (math.isfinite(num_tokens) and num_tokens > 0):
            raise ValueError(f"{fn}: num_tokens must be a positive number, got {num_tokens!r}")
    if agg == "seq-mean-token-sum-norm":
        if max_response_length is None:
            raise ValueError(
                f"{fn}: agg 'seq-mean-token-sum-norm' needs max_response_length (the configured maximum "
                "response length, Dr. GRPO's constant)"
            )
        if (
            isinstance(max_response_length, bool)
            or not isinstance(max_response_length, (int, float))
            or not (math.isfinite(max_response_length) and max_response_length > 0)
        ):
            raise ValueError(f"{fn}: max_response_length must be a positive number, got {max_response_length!r}")


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages, one per completion.

    ``A_i = (r_i - mean(group)) / (std(group) + eps)`` with ``std`` the unbiased sample standard deviation
    (``torch.std``'s default, as in verl and TRL); with ``normalize_std=False`` (Dr. GRPO) ``A_i = r_i -
    mean(group)``. A group whose rewards are all equal gets advantage 0.

    ``group_size == 1`` has no baseline (and an undefined unbiased std): its advantages are defined as 0.

    Args:
        rewards: ``[B]`` real rewards, ``B = prompts x group_size``, each prompt's completions consecutive.
        group_size: ``G >= 1`` completions per prompt.
        normalize_std: divide by the group's std (GRPO) or not (Dr. GRPO).
        eps: added to the std, ``>= 0``.

    Returns:
        ``[B]`` float32 advantages on the rewards' device, without gradient.

    Raises:
        ValueError: naming the argument when ``rewards`` is not a 1-D real tensor, holds NaN or inf,
            ``group_size`` is not an integer ``>= 1`` or does not divide ``B``, or ``eps < 0``.
    """
    fn = "group_advantages"
    _check_tensor("rewards", fn, rewards)
    if rewards.dim() != 1:
        raise ValueError(f"{fn}: rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if rewards.dtype.is_complex:
        raise ValueError(f"{fn}: rewards must be real, got {rewards.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"{fn}: group_size must be an int, got {group_size!r}")
    if group_size < 1:
        raise ValueError(f"{fn}: group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"{fn}: the number of rewards ({rewards.numel()}) must be a multiple of group_size ({group_size})"
        )
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{fn}: eps must be a finite number >= 0, got {eps!r}")
    # float64 for the statistics: cheap for B numbers, and exact for rewards with a large common offset.
    r = rewards.detach().to(torch.float64)
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"{fn}: rewards must be finite, got NaN or inf")
    if group_size == 1:
        return torch.zeros(r.shape, dtype=torch.float32, device=r.device)
    grouped = r.reshape(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1).to(torch.float32)


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    agg: str,
    num_tokens: int | float | torch.Tensor | None = None,
    max_response_length: int | None = None,
) -> torch.Tensor:
    """Reduce per-token values to one scalar over the masked tokens; the single place every loss is aggregated.

    Modes (``s`` = sum over the masked tokens, ``n_b`` = masked tokens of sequence ``b``):

    - ``"token-mean"``: ``s / num_tokens``. ``num_tokens`` defaults to ``mask.sum()`` (1 if that is 0); the
      trainer passes the whole optimiser step's token count (all micro-batches and DP ranks, docs/design.md §7).
    - ``"seq-mean-token-mean"``: mean over the sequences with ``n_b > 0`` of ``sum_b / n_b`` (0 if none).
    - ``"seq-mean-token-sum-norm"`` (Dr. GRPO): ``s / (B * max_response_length)``; ``max_response_length``
      is required.

    ``num_tokens`` is used by ``"token-mean"`` only and ignored by the other modes.
    Unmasked positions never reach the result, not even as NaN or inf.

    Args:
        values: ``[B, T]`` float per-token values (any float dtype).
        mask: ``[B, T]`` bool or 0/1; nonzero marks a completion token that counts.
        agg: one of ``AGGREGATIONS``.
        num_tokens: positive number or 1-element tensor, see ``"token-mean"``.
        max_response_length: positive constant for ``"seq-mean-token-sum-norm"``.

    Returns:
        0-dim tensor, float32 (float64 for float64 values), differentiable with respect to ``values``.

    Raises:
        ValueError: on an unknown ``agg`` (the message lists the valid names), a missing or non-positive
            ``max_response_length`` for ``"seq-mean-token-sum-norm"``, a non-positive ``num_tokens``, or
            mismatched shapes.
    """
    fn = "aggregate"
    _check_float_tensor("values", fn, values)
    if values.dim() != 2:
        raise ValueError(f"{fn}: values must be [B, T], got shape {tuple(values.shape)}")
    mask = _as_bool_mask(mask, values.shape, fn)
    _check_agg(agg, fn, num_tokens, max_response_length)
    return _aggregate(values.to(_compute_dtype(values)), mask, agg, num_tokens, max_response_length)


def _aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    agg: str,
    num_tokens: int | float | torch.Tensor | None,
    max_response_length: int | None,
) -> torch.Tensor:
    # where, not multiply: padding may hold NaN or inf, and 0 * inf is NaN.
    masked = torch.where(mask, values, values.new_zeros(()))
    if agg == "token-mean":
        if num_tokens is None:
            denom = mask.sum().clamp(min=1).to(values.dtype)
        else:
            denom = torch.as_tensor(num_tokens, device=values.device).to(values.dtype).reshape(())
        return masked.sum() / denom
    if agg == "seq-mean-token-mean":
        counts = mask.sum(dim=1)
        # Empty sequences contribute 0 / 1 = 0 to the sum and are left out of the count.
        seq_means = masked.sum(dim=1) / counts.clamp(min=1).to(values.dtype)
        num_seqs = (counts > 0).sum().clamp(min=1).to(values.dtype)
        return seq_means.sum() / num_seqs
    # seq-mean-token-sum-norm: a constant denominator, so a token's weight does not depend on its length.
    return masked.sum() / (values.shape[0] * float(max_response_length))


def _check_loss_tensors(
    fn: str, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``policy_loss``'s tensors checked (``[B, T]`` float log-probs, ``[B]`` or ``[B, T]`` real advantages);
    the mask as bool."""
    _check_float_tensor("logprobs", fn, logprobs)
    _check_float_tensor("old_logprobs", fn, old_logprobs)
    _check_tensor("advantages", fn, advantages)
    if logprobs.dim() != 2:
        raise ValueError(f"{fn}: logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    if old_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"{fn}: old_logprobs must have the shape of logprobs {tuple(logprobs.shape)}, "
            f"got {tuple(old_logprobs.shape)}"
        )
    if advantages.dtype.is_complex or advantages.dtype == torch.bool:
        raise ValueError(f"{fn}: advantages must be real numbers, got {advantages.dtype}")
    if tuple(advantages.shape) not in (tuple(logprobs.shape[:1]), tuple(logprobs.shape)):
        raise ValueError(
            f"{fn}: advantages must be [B] or [B, T] = {tuple(logprobs.shape)}, got {tuple(advantages.shape)}"
        )
    return _as_bool_mask(mask, logprobs.shape, fn)


def _check_loss_settings(
    fn: str,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    agg: str,
    num_tokens: int | float | torch.Tensor | None,
    max_response_length: int | None,
) -> None:
    """``policy_loss``'s clip range, dual clip and aggregation checked."""
    if not (math.isfinite(clip_low) and 0.0 <= clip_low <= 1.0):
        raise ValueError(f"{fn}: clip_low must lie in [0, 1], got {clip_low!r}")
    if not (math.isfinite(clip_high) and clip_high >= 0.0):
        raise ValueError(f"{fn}: clip_high must be >= 0, got {clip_high!r}")
    if dual_clip is not None and not (math.isfinite(dual_clip) and dual_clip > 1.0):
        raise ValueError(f"{fn}: dual_clip must be a number > 1 (or None), got {dual_clip!r}")
    _check_agg(agg, fn, num_tokens, max_response_length)


def _check_behaviour(fn: str, logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, is_cap: float) -> None:
    """The decoupled loss's behaviour log-probs (the shape of ``logprobs``) and its importance-weight cap."""
    _check_float_tensor("behaviour_logprobs", fn, behaviour_logprobs)
    if behaviour_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"{fn}: behaviour_logprobs must have the shape of logprobs {tuple(logprobs.shape)}, "
            f"got {tuple(behaviour_logprobs.shape)}"
        )
    if not (math.isfinite(is_cap) and is_cap >= 1.0):
        raise ValueError(f"{fn}: is_cap must be a number >= 1 (algorithm.is_cap), got {is_cap!r}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    dual_clip: float | None = None,
    max_response_length: int | None = None,
    num_tokens: int | float | torch.Tensor | None = None,
    behaviour_logprobs: torch.Tensor | None = None,
    is_cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO/PPO surrogate loss, aggregated over the completion tokens.

    Per token, with ``r = exp(logprobs - old_logprobs)`` and ``clip(r) = clamp(r, 1 - clip_low, 1 + clip_high)``::

        loss_t = -min(r * A, clip(r) * A)                  = max(-r * A, -clip(r) * A)

    Dual clip (Ye et al. 2020, "Mastering complex control in MOBA games with deep RL"), ``dual_clip = c > 1``:
    for tokens with ``A < 0`` the objective is additionally bounded below by ``c * A``::

        loss_t = -max(min(r * A, clip(r) * A), c * A)      = min(max(-r * A, -clip(r) * A), -c * A)

    i.e. a negative-advantage token's loss is capped at ``c * |A|``, reached when ``r > c``; above it the
    token gives no gradient. Tokens with ``A >= 0`` are unchanged.

    Decoupled (asynchronous GRPO, see the module docstring): with ``behaviour_logprobs`` given, ``old_logprobs``
    is the proximal policy and each token's loss above is multiplied by the detached truncated importance
    weight ``w = min(exp(old_logprobs - behaviour_logprobs), is_cap)``. ``None``: no weight (today's loss).

    Args:
        logprobs: ``[B, T]`` float log-probs of the sampled tokens under the policy being optimised
            (differentiable).
        old_logprobs: ``[B, T]`` float log-probs under the sampling policy (treated as constants).
        advantages: ``[B]`` (one per completion) or ``[B, T]`` float (treated as constants).
        mask: ``[B, T]`` bool or 0/1, nonzero on completion tokens that count. Unmasked positions may hold
            anything (even -inf): they reach neither the loss, the gradient nor the metrics.
        clip_low, clip_high: ``eps_low`` in [0, 1] and ``eps_high >= 0`` of the clip range.
        agg: one of ``AGGREGATIONS``, see ``aggregate``.
        dual_clip: ``c > 1`` or ``None`` (off).
        max_response_length: the constant of ``"seq-mean-token-sum-norm"`` (required there).
        num_tokens: the ``"token-mean"`` denominator (default: this call's masked token count).
        behaviour_logprobs: ``[B, T]`` float log-probs under the policy that sampled (the rollout's), or
            ``None`` (synchronous: no importance weight). Treated as constants.
        is_cap: the truncation of the importance weight, ``>= 1`` (an on-policy token keeps weight 1).

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-dim float32 tensor (float64 for float64 inputs); ``metrics`` maps
        names to detached 0-dim tensors of the same dtype, each over this call's masked tokens (0 when there
        are none): ``clip_fraction`` (fraction where the clipped term is strictly the larger loss, i.e. the
        clip changed the token's loss; counted before dual clip), ``approx_kl`` (mean k3 estimate of
        KL(pi_old || pi_new), ``(r - 1) - log r``), ``ratio_mean``, ``ratio_max``, ``ratio_min`` and, when
        ``dual_clip`` is set, ``dual_clip_fraction`` (fraction where the ``-c * A`` cap was strictly active); with
        ``behaviour_logprobs``, ``is_truncated_fraction`` (fraction where ``exp(old - behaviour) > is_cap``) and
        ``is_weight_mean`` (the mean truncated weight).

    Raises:
        ValueError: on mismatched shapes, non-float log-probs, an unknown ``agg``, a missing
            ``max_response_length`` for ``"seq-mean-token-sum-norm"``, clip values out of range, or
            ``dual_clip <= 1``, ``is_cap < 1`` or a ``behaviour_logprobs`` of another shape.
    """
    fn = "policy_loss"
    mask = _check_loss_tensors(fn, logprobs, old_logprobs, advantages, mask)
    _check_loss_settings(fn, clip_low, clip_high, dual_clip, agg, num_tokens, max_response_length)
    if behaviour_logprobs is not None:
        _check_behaviour(fn, logprobs, behaviour_logprobs, is_cap)

    extra = () if behaviour_logprobs is None else (behaviour_logprobs,)
    dtype = _compute_dtype(logprobs, old_logprobs, advantages, *extra)
    adv = advantages.detach().to(dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)  # one advantage for every token of the completion
    adv = adv.expand(logprobs.shape)
    # Zero the log-ratio at padding before exp: padding may hold -inf, and exp(inf) would turn the backward
    # into 0 * inf = NaN even though the aggregation ignores those positions.
    log_ratio = torch.where(mask, logprobs.to(dtype) - old_logprobs.detach().to(dtype), 0.0)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped_loss = torch.maximum(loss_unclipped, loss_clipped)  # = -min(r A, clip(r) A), the pessimistic bound
    token_loss = clipped_loss
    if dual_clip is not None:
        cap = -dual_clip * adv  # = c |A| where A < 0
        token_loss = torch.where(adv < 0, torch.minimum(clipped_loss, cap), clipped_loss)
    if behaviour_logprobs is not None:
        # Zeroed at padding as the log-ratio above; detached: the weight corrects the sampling, it is not optimised.
        log_w = torch.where(mask, old_logprobs.detach().to(dtype) - behaviour_logprobs.detach().to(dtype), 0.0)
        raw_weight = torch.exp(log_w)
        weight = raw_weight.clamp(max=is_cap)
        token_loss = weight * token_loss

    loss = _aggregate(token_loss, mask, agg, num_tokens, max_response_length)

    with torch.no_grad():
        count = mask.sum()
        denom = count.clamp(min=1).to(dtype)
        zero = ratio.new_zeros(())

        def masked_mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, x, zero).sum() / denom

        metrics = {
            "clip_fraction": masked_mean((loss_clipped > loss_unclipped).to(dtype)),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio),
            "ratio_mean": masked_mean(ratio),
            # torch.where on the count rather than `if`: no host sync, and 0 for an empty mask.
            "ratio_max": torch.where(count > 0, torch.where(mask, ratio, -math.inf).amax(), zero),
            "ratio_min": torch.where(count > 0, torch.where(mask, ratio, math.inf).amin(), zero),
        }
        if dual_clip is not None:
            metrics["dual_clip_fraction"] = masked_mean(((adv < 0) & (cap < clipped_loss)).to(dtype))
        if behaviour_logprobs is not None:
            metrics["is_truncated_fraction"] = masked_mean((raw_weight > is_cap).to(dtype))
            metrics["is_weight_mean"] = masked_mean(weight)
    return loss, metrics


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL loss term from tokens sampled from the policy (Schulman's estimators), docs/design.md §1.

    With ``x = logprobs - ref_logprobs`` (``log pi_pol(y) - log pi_ref(y)``, y ~ pi_pol) and the gradient
    flowing through ``log pi_pol(y)`` only (the sampled token's value; no score-function term), what each
    estimator's value estimates and what its expected gradient minimises:

    - ``k3 = exp(-x) - 1 + x`` (the default, as in GRPO/DeepSeekMath): the value is unbiased for
      KL(pi_pol || pi_ref), but the expected gradient, E_pol[(1 - pi_ref/pi_pol) grad log pi_pol], is that of
      KL(pi_ref || pi_pol) (the reverse direction).
    - ``k2 = 0.5 * x**2``: the value is biased (>= 0), the expected gradient, E_pol[x grad log pi_pol], is
      that of KL(pi_pol || pi_ref).
    - ``k1 = x`` is refused (ValueError): unbiased as a value, but its expected gradient is
      E_pol[grad log pi_pol] = 0, a silent no-op regulariser. This function is the loss term only, so the
      refusal does not depend on whether a gradient is being taken.

    The trainer adds ``beta * aggregate(kl_penalty(...), mask, agg, ...)`` to ``policy_loss`` (docs/design.md §7).

    Args:
        logprobs: ``[...]`` float log-probs of the sampled tokens under the policy (differentiable).
        ref_logprobs: ``[...]`` float log-probs of the same tokens under the reference, same shape.
        estimator: one of ``KL_ESTIMATORS`` (``k2``, ``k3``).

    Returns:
        ``[...]`` float32 per-token values (float64 for float64 inputs).

    Raises:
        ValueError: on ``k1``, an unknown estimator, non-float inputs or mismatched shapes.
    """
    fn = "kl_penalty"
    if estimator == "k1":
        raise ValueError(f"{fn}: {K1_REFUSED}; use k2 or k3 (config key algorithm.kl_estimator)")
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"{fn}: unknown estimator {estimator!r}; valid names are {', '.join(KL_ESTIMATORS)}")
    _check_float_tensor("logprobs", fn, logprobs)
    _check_float_tensor("ref_logprobs", fn, ref_logprobs)
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"{fn}: logprobs and ref_logprobs must have the same shape, got {tuple(logprobs.shape)} "
            f"and {tuple(ref_logprobs.shape)}"
        )
    dtype = _compute_dtype(logprobs, ref_logprobs)
    log_ratio = logprobs.to(dtype) - ref_logprobs.to(dtype)
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    # expm1 keeps precision for small x; the clamp removes rounding below 0 (there the gradient, 1 - exp(-x),
    # is itself ~0, so nothing is lost).
    return (torch.expm1(-log_ratio) + log_ratio).clamp_min(0.0)

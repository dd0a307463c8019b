"""GRPO advantages, policy loss, aggregations and KL estimators against hand-computed float64 numbers."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_logitavg.algorithms import grpo
from nemo_logitavg.algorithms.grpo import aggregate, group_advantages, kl_penalty, policy_loss

# ---------------------------------------------------------------------------------------------------------
# Independent float64 references: plain Python loops over lists, never calling the module under test.


def ref_token_losses(lp, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=None):
    """Per-token losses as nested lists (None where masked out); adv is one number per sequence."""
    out = []
    for i in range(len(lp)):
        row = []
        for j in range(len(lp[i])):
            if not mask[i][j]:
                row.append(None)
                continue
            r = math.exp(lp[i][j] - old[i][j])
            a = adv[i]
            clipped_r = min(max(r, 1 - clip_low), 1 + clip_high)
            objective = min(r * a, clipped_r * a)
            if dual_clip is not None and a < 0:
                objective = max(objective, dual_clip * a)
            row.append(-objective)
        out.append(row)
    return out


def ref_aggregate(token_losses, agg, num_tokens=None, max_response_length=None):
    flat = [x for row in token_losses for x in row if x is not None]
    if agg == "token-mean":
        return sum(flat) / (num_tokens if num_tokens is not None else len(flat))
    if agg == "seq-mean-token-mean":
        seq_means = [
            sum(x for x in row if x is not None) / sum(x is not None for x in row)
            for row in token_losses
            if any(x is not None for x in row)
        ]
        return sum(seq_means) / len(seq_means)
    assert agg == "seq-mean-token-sum-norm"
    return sum(flat) / (len(token_losses) * max_response_length)


# A small batch: B = 3, T = 3. Row 0 has 3 tokens (A > 0), row 1 has 2 (A < 0, last position is padding
# holding -inf), row 2 has none. Log-ratios are chosen so that every branch occurs:
#   (0,0) 0.1  r=1.105 inside the clip range        (0,1) 0.3  r=1.350 > 1.2, A>0: clip active
#   (0,2) -0.3 r=0.741 < 0.8, A>0: no clip (pessimistic)  (1,0) -0.4 r=0.670 < 0.8, A<0: clip active
#   (1,1) 0.6  r=1.822 > 1.2, A<0: no clip, dual clip with c=1.5 caps the loss at 1.5*0.8 = 1.2
LP = [[-1.0, -0.5, -2.0], [-1.3, -0.4, -3.0], [-0.1, -0.2, -0.3]]
OLD = [[-1.1, -0.8, -1.7], [-0.9, -1.0, -math.inf], [-0.5, -0.5, -0.5]]
ADV = [1.5, -0.8, 0.7]
MASK = [[1, 1, 1], [1, 1, 0], [0, 0, 0]]


def batch(dtype=torch.float32, requires_grad=False):
    lp = torch.tensor(LP, dtype=dtype, requires_grad=requires_grad)
    return lp, torch.tensor(OLD, dtype=dtype), torch.tensor(ADV, dtype=dtype), torch.tensor(MASK, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------------------
# group_advantages


def test_advantages_std_normalised_several_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, 4)
    assert adv.dtype == torch.float32 and adv.shape == (12,)
    # group 1: mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3; group 2: mean 0.75, var = (3 * 0.0625 + 0.5625) / 3
    # = 0.25 so std 0.5; group 3: all equal, advantage 0.
    s1 = math.sqrt(1 / 3) + 1e-6
    s2 = 0.5 + 1e-6
    expected = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, 0.25 / s2, 0.25 / s2, 0.25 / s2, -0.75 / s2] + [0.0] * 4
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_advantages_non_binary_and_without_std():
    rewards = torch.tensor([2.0, 4.0, 9.0, -1.0, 1.0, 0.0], dtype=torch.float64)
    # group 1: mean 5, deviations (-3, -1, 4), unbiased var 26 / 2 = 13; group 2: mean 0, (-1, 1, 0), var 1.
    std = group_advantages(rewards, 3)
    s1 = math.sqrt(13) + 1e-6
    s2 = 1.0 + 1e-6
    expected = torch.tensor([-3 / s1, -1 / s1, 4 / s1, -1 / s2, 1 / s2, 0.0])
    assert std.dtype == torch.float32
    torch.testing.assert_close(std, expected, rtol=1e-6, atol=1e-6)
    # Dr. GRPO: mean-centred only.
    plain = group_advantages(rewards, 3, normalize_std=False)
    torch.testing.assert_close(plain, torch.tensor([-3.0, -1.0, 4.0, -1.0, 1.0, 0.0]))
    # A custom eps enters the denominator.
    torch.testing.assert_close(group_advantages(rewards[:3], 3, eps=1.0)[2], torch.tensor(4 / (math.sqrt(13) + 1)))


def test_advantages_group_size_one_is_zero_and_int_rewards():
    assert torch.equal(group_advantages(torch.tensor([3.0, -2.0, 7.0]), 1), torch.zeros(3))
    torch.testing.assert_close(
        group_advantages(torch.tensor([1, 3]), 2, normalize_std=False), torch.tensor([-1.0, 1.0])
    )


@pytest.mark.parametrize(
    ("rewards", "group_size", "match"),
    [
        (torch.zeros(5), 2, "multiple of group_size"),
        (torch.zeros(4), 0, "group_size must be >= 1"),
        (torch.zeros(4), 2.0, "group_size must be an int"),
        (torch.zeros(2, 2), 2, "rewards must be 1-D"),
        (torch.tensor([1.0, float("nan")]), 2, "rewards must be finite"),
        (torch.tensor([1.0, float("inf")]), 2, "rewards must be finite"),
        ([1.0, 0.0], 2, "rewards must be a torch.Tensor"),
    ],
)
def test_advantages_bad_inputs(rewards, group_size, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size)


# ---------------------------------------------------------------------------------------------------------
# policy_loss


@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_loss_matches_float64_loop(agg, dual_clip):
    lp, old, adv, mask = batch()
    expected = ref_aggregate(ref_token_losses(LP, OLD, ADV, MASK, dual_clip=dual_clip), agg, max_response_length=4)
    loss, metrics = policy_loss(lp, old, adv, mask, agg=agg, dual_clip=dual_clip, max_response_length=4)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-6)
    assert ("dual_clip_fraction" in metrics) == (dual_clip is not None)


def test_loss_hand_numbers():
    # Literal numbers for the batch above (rows 0 and 1; row 2 has no tokens).
    e = math.exp
    row0 = [-1.5 * e(0.1), -1.5 * 1.2, -1.5 * e(-0.3)]  # inside range; clipped at 1.2; r < 0.8 but A > 0
    row1 = [0.8 * 0.8, 0.8 * e(0.6)]  # clipped at 0.8 (A < 0); unclipped r = 1.822 (A < 0)
    lp, old, adv, mask = batch(torch.float64)
    loss, _ = policy_loss(lp, old, adv, mask)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx((sum(row0) + sum(row1)) / 5, abs=1e-12)
    loss, _ = policy_loss(lp, old, adv, mask, agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx((sum(row0) / 3 + sum(row1) / 2) / 2, abs=1e-12)
    loss, _ = policy_loss(lp, old, adv, mask, agg="seq-mean-token-sum-norm", max_response_length=4)
    assert loss.item() == pytest.approx((sum(row0) + sum(row1)) / (3 * 4), abs=1e-12)
    # Dual clip c = 1.5: the A < 0 token with r = 1.822 > c is capped at c * |A| = 1.2.
    loss, metrics = policy_loss(lp, old, adv, mask, dual_clip=1.5)
    assert loss.item() == pytest.approx((sum(row0) + 0.64 + 1.2) / 5, abs=1e-12)
    assert metrics["dual_clip_fraction"].item() == pytest.approx(1 / 5)
    # With c = 2 > r the cap does not bind.
    loss, metrics = policy_loss(lp, old, adv, mask, dual_clip=2.0)
    assert loss.item() == pytest.approx((sum(row0) + sum(row1)) / 5, abs=1e-12)
    assert metrics["dual_clip_fraction"].item() == 0.0


def test_dual_clip_single_token_and_gradient():
    old = torch.zeros(1, 1)
    adv = torch.tensor([-1.0])
    mask = torch.ones(1, 1, dtype=torch.bool)
    lp = torch.ones(1, 1, requires_grad=True)  # r = e = 2.718
    loss, metrics = policy_loss(lp, old, adv, mask, dual_clip=3.0)
    assert loss.item() == pytest.approx(math.e, rel=1e-6)  # r < c: ordinary loss -r*A = e
    loss, metrics = policy_loss(lp, old, adv, mask, dual_clip=2.0)
    assert loss.item() == pytest.approx(2.0, rel=1e-6)  # r > c: capped at -c*A = 2
    assert metrics["dual_clip_fraction"].item() == 1.0
    loss.backward()
    assert lp.grad.item() == 0.0  # the cap is constant in r: no gradient
    # A positive advantage is never dual-clipped.
    loss, metrics = policy_loss(lp.detach().neg(), old, -adv, mask, dual_clip=2.0)
    assert loss.item() == pytest.approx(-math.exp(-1.0), rel=1e-6)  # r = 1/e < 0.8 with A > 0: -r * A
    assert metrics["dual_clip_fraction"].item() == 0.0


def test_metrics_match_loop():
    lp, old, adv, mask = batch(torch.float64)
    _, metrics = policy_loss(lp, old, adv, mask)
    ratios = [math.exp(LP[i][j] - OLD[i][j]) for i in range(3) for j in range(3) if MASK[i][j]]
    assert set(metrics) == {"clip_fraction", "approx_kl", "ratio_mean", "ratio_max", "ratio_min"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in metrics.values())
    # Clip active at (0, 1) and (1, 0) only: 2 of 5 tokens.
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 5)
    assert metrics["approx_kl"].item() == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 5)
    assert metrics["ratio_mean"].item() == pytest.approx(sum(ratios) / 5)
    assert metrics["ratio_max"].item() == pytest.approx(max(ratios))
    assert metrics["ratio_min"].item() == pytest.approx(min(ratios))


def test_clip_fraction_counts():
    # 8 tokens, A = +1 on row 0 and -1 on row 1; log-ratios ±0.5 are outside [0.8, 1.2], ±0.05 inside.
    lp = torch.tensor([[0.5, -0.5, 0.05, -0.05], [0.5, -0.5, 0.05, 0.5]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    # Active: (0,0) r>1.2 with A>0; (1,1) r<0.8 with A<0. Not: (0,1) and (1,0) (pessimistic side), inside ones,
    # and the masked (1,3).
    _, metrics = policy_loss(lp, torch.zeros_like(lp), adv, mask)
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 7)
    _, metrics = policy_loss(lp, torch.zeros_like(lp), adv, mask, clip_low=0.9, clip_high=1.0)
    assert metrics["clip_fraction"].item() == 0.0
    _, metrics = policy_loss(lp, lp.detach(), adv, mask)
    assert metrics["clip_fraction"].item() == 0.0 and metrics["approx_kl"].item() == 0.0


def test_asymmetric_clip():
    # r = e^0.25 = 1.284: clipped with clip_high 0.2, not with clip_high 0.3 ("clip higher").
    lp = torch.full((1, 1), 0.25)
    adv = torch.tensor([2.0])
    mask = torch.ones(1, 1)
    loss, metrics = policy_loss(lp, torch.zeros(1, 1), adv, mask, clip_low=0.1, clip_high=0.2)
    assert loss.item() == pytest.approx(-2 * 1.2) and metrics["clip_fraction"].item() == 1.0
    loss, metrics = policy_loss(lp, torch.zeros(1, 1), adv, mask, clip_low=0.1, clip_high=0.3)
    assert loss.item() == pytest.approx(-2 * math.exp(0.25)) and metrics["clip_fraction"].item() == 0.0
    # r = e^-0.15 = 0.861 with A < 0: clipped at 1 - 0.1 = 0.9 by clip_low 0.1, not by 0.2.
    loss, _ = policy_loss(-lp * 0.6, torch.zeros(1, 1), -adv, mask, clip_low=0.1, clip_high=0.2)
    assert loss.item() == pytest.approx(2 * 0.9)
    loss, _ = policy_loss(-lp * 0.6, torch.zeros(1, 1), -adv, mask, clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(2 * math.exp(-0.15))


def test_ratio_one_gives_minus_mean_advantage():
    lp = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([0.5, -1.0, 2.0, 0.25])
    mask = torch.ones(4, 5, dtype=torch.bool)
    loss, metrics = policy_loss(lp, lp.clone(), adv, mask)
    assert loss.item() == pytest.approx(-(0.5 - 1.0 + 2.0 + 0.25) / 4, abs=1e-6)
    assert metrics["ratio_mean"].item() == 1.0 and metrics["ratio_max"].item() == 1.0
    assert metrics["ratio_min"].item() == 1.0
    # Per-token advantages equal to the broadcast [B] ones give the same loss.
    loss_bt, _ = policy_loss(lp, lp.clone(), adv[:, None].expand(4, 5), mask)
    assert loss_bt.item() == loss.item()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradient_step_direction(sign):
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    lp = old.clone().requires_grad_()
    adv = torch.tensor([sign])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, _ = policy_loss(lp, old, adv, mask)
    loss.backward()
    # At r = 1 the gradient is -A / num_tokens per token.
    torch.testing.assert_close(lp.grad, torch.full((1, 3), -sign / 3))
    stepped = (lp - 0.05 * lp.grad).detach()
    new_loss, _ = policy_loss(stepped, old, adv, mask)
    assert new_loss.item() < loss.item()
    # Positive advantage raises the sampled tokens' log-probs, negative lowers them.
    assert bool(((stepped - old) * sign > 0).all())


def test_clipped_tokens_give_no_gradient():
    old = torch.zeros(1, 2)
    lp = torch.tensor([[0.5, 0.05]], requires_grad=True)  # r = 1.65 (clipped with A>0), 1.05 (inside)
    loss, _ = policy_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    assert lp.grad[0, 0].item() == 0.0
    assert lp.grad[0, 1].item() == pytest.approx(-math.exp(0.05) / 2, rel=1e-6)


def test_num_tokens_overrides_denominator_and_padding_is_inert():
    lp, old, adv, mask = batch(requires_grad=True)
    expected = ref_aggregate(ref_token_losses(LP, OLD, ADV, MASK), "token-mean", num_tokens=12)
    loss, _ = policy_loss(lp, old, adv, mask, num_tokens=12)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float32))
    loss_t, _ = policy_loss(lp, old, adv, mask, num_tokens=torch.tensor(12))
    torch.testing.assert_close(loss_t, loss)
    # The padded position (1, 2) holds old = -inf: loss and gradient stay finite, padding gets no gradient.
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    assert lp.grad[1, 2].item() == 0.0 and (lp.grad[2] == 0).all()


def test_masks_dtypes_and_empty_batch():
    lp, old, adv, mask = batch()
    ref, _ = policy_loss(lp, old, adv, mask)
    for m in (mask.float(), mask.long(), mask.to(torch.uint8)):
        loss, _ = policy_loss(lp, old, adv, m)
        assert loss.item() == ref.item()
    # bf16 inputs compute in float32.
    loss, metrics = policy_loss(lp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask)
    assert loss.dtype == torch.float32 and metrics["ratio_mean"].dtype == torch.float32
    # No tokens at all: loss 0 (keeps the graph) and all metrics 0, no NaN.
    lp_g = lp.clone().requires_grad_()
    for agg in grpo.AGGREGATIONS:
        loss, metrics = policy_loss(lp_g, old, adv, torch.zeros_like(mask), agg=agg, max_response_length=3)
        assert loss.item() == 0.0 and loss.requires_grad
        assert all(v.item() == 0.0 for v in metrics.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"agg": "mean"}, "token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"),
        ({"agg": "seq-mean-token-sum-norm"}, "needs max_response_length"),
        ({"agg": "seq-mean-token-sum-norm", "max_response_length": 0}, "max_response_length must be a positive"),
        ({"dual_clip": 1.0}, "dual_clip must be a number > 1"),
        ({"clip_low": -0.1}, "clip_low must lie in"),
        ({"clip_low": 1.5}, "clip_low must lie in"),
        ({"clip_high": -0.2}, "clip_high must be >= 0"),
        ({"num_tokens": 0}, "num_tokens must be a positive"),
        ({"num_tokens": torch.ones(2)}, "num_tokens must be a single number"),
        ({"old_logprobs": torch.zeros(3, 4)}, "old_logprobs must have the shape"),
        ({"advantages": torch.zeros(4)}, r"advantages must be \[B\] or \[B, T\]"),
        ({"mask": torch.ones(3, 2)}, "mask must have shape"),
        ({"logprobs": torch.zeros(3, 3, dtype=torch.long)}, "logprobs must be a floating-point"),
        ({"logprobs": torch.zeros(9)}, r"logprobs must be \[B, T\]"),
    ],
)
def test_policy_loss_bad_inputs(kwargs, match):
    lp, old, adv, mask = batch()
    args = {"logprobs": lp, "old_logprobs": old, "advantages": adv, "mask": mask, **kwargs}
    with pytest.raises(ValueError, match=match):
        policy_loss(**args)


# ---------------------------------------------------------------------------------------------------------
# aggregate


def test_aggregate_modes_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 0.0], [float("inf"), 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(values, mask, "token-mean", num_tokens=20).item() == pytest.approx(10 / 20)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum-norm", max_response_length=5).item() == pytest.approx(10 / 15)
    with pytest.raises(ValueError, match="unknown agg"):
        aggregate(values, mask, "sum")
    with pytest.raises(ValueError, match="needs max_response_length"):
        aggregate(values, mask, "seq-mean-token-sum-norm")


# ---------------------------------------------------------------------------------------------------------
# kl_penalty


def test_kl_estimators_formulas():
    x = [0.5, -0.2, 0.0, 3.0, -2.5]
    lp = torch.tensor([[v - 1.0 for v in x]], dtype=torch.float64)
    ref = torch.full_like(lp, -1.0)
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), torch.tensor([[0.5 * v * v for v in x]], dtype=torch.float64))
    k3 = [math.exp(-v) - 1 + v for v in x]
    torch.testing.assert_close(kl_penalty(lp, ref), torch.tensor([k3], dtype=torch.float64))
    assert kl_penalty(lp.bfloat16(), ref.bfloat16()).dtype == torch.float32
    # k3 >= 0 everywhere, including tiny log-ratios where rounding could go below 0.
    g = torch.Generator().manual_seed(0)
    lr = torch.cat([torch.randn(10_000, generator=g) * 3, torch.randn(10_000, generator=g) * 1e-7])
    assert (kl_penalty(lr, torch.zeros_like(lr)) >= 0).all()
    assert (kl_penalty(lr, torch.zeros_like(lr), "k2") >= 0).all()
    with pytest.raises(ValueError, match="k2, k3"):
        kl_penalty(lp, ref, "k4")
    with pytest.raises(ValueError, match="same shape"):
        kl_penalty(lp, ref[:, :2])


def _categoricals(seed: int, vocab: int = 7):
    """Policy logits (a float64 leaf) and a fixed reference distribution on a small vocabulary."""
    g = torch.Generator().manual_seed(seed)
    policy_logits = (torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    ref_logp = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5, dim=0)
    return policy_logits, ref_logp


def _expected_kl_term(policy_logits: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """E_{y ~ pi_pol}[kl_penalty(log pi_pol(y), log pi_ref(y))] by enumerating every token y, as the trainer
    builds it: log pi_pol(y) from mixed_logprobs at ref_weight 0, the gradient through the sampled token's
    log-prob only (the sampling weights pi_pol(y) are constants: no score-function term)."""
    from nemo_logitavg.ops import mixed_logprobs

    vocab = policy_logits.shape[0]
    tokens = torch.arange(vocab)
    logits = policy_logits.unsqueeze(0).expand(vocab, vocab)  # one "sampled token" per row
    logprobs = mixed_logprobs(logits, torch.zeros(vocab, vocab, dtype=torch.float64), tokens, 0.0)
    weights = logprobs.detach().exp()
    return (weights * kl_penalty(logprobs, ref_logp, estimator)).sum()


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    return (p_log.exp() * (p_log - q_log)).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_estimators_expected_gradient_by_enumeration(seed):
    """k2's expected gradient is that of KL(pi_pol || pi_ref); k3's value is KL(pi_pol || pi_ref) in
    expectation but its expected gradient is that of KL(pi_ref || pi_pol). Exact sums over the vocabulary."""
    policy_logits, ref_logp = _categoricals(seed)
    pol_logp = torch.log_softmax(policy_logits, dim=0)
    (grad_forward,) = torch.autograd.grad(_kl(pol_logp, ref_logp), policy_logits, retain_graph=True)
    (grad_reverse,) = torch.autograd.grad(_kl(ref_logp, pol_logp), policy_logits)
    # The two directions differ clearly here, so matching one is not matching the other by accident.
    assert (grad_forward - grad_reverse).norm() > 0.1 * grad_forward.norm()

    k2 = _expected_kl_term(policy_logits, ref_logp, "k2")
    (g2,) = torch.autograd.grad(k2, policy_logits)
    torch.testing.assert_close(g2, grad_forward, rtol=1e-10, atol=1e-12)

    k3 = _expected_kl_term(policy_logits, ref_logp, "k3")
    (g3,) = torch.autograd.grad(k3, policy_logits)
    torch.testing.assert_close(g3, grad_reverse, rtol=1e-10, atol=1e-12)
    # k3's value is unbiased for KL(pi_pol || pi_ref) (k2's is not).
    assert k3.item() == pytest.approx(_kl(pol_logp, ref_logp).item(), rel=1e-10)

    # k1 (the log-ratio) would have expected gradient E_pol[grad log pi_pol] = 0: refused as a loss.
    vocab = policy_logits.shape[0]
    logp = torch.log_softmax(policy_logits.unsqueeze(0).expand(vocab, vocab), dim=1).diagonal()
    (g1,) = torch.autograd.grad((logp.detach().exp() * (logp - ref_logp)).sum(), policy_logits)
    assert g1.abs().max() < 1e-12
    with pytest.raises(ValueError, match="k1 .*refused as a loss.*algorithm.kl_estimator"):
        kl_penalty(logp, ref_logp, "k1")


def test_config_refuses_k1():
    from nemo_logitavg.config import GRPOConfig

    cfg = GRPOConfig()
    cfg.algorithm.kl_estimator = "k1"
    with pytest.raises(ValueError, match="algorithm.kl_estimator must be one of k2, k3 .*zero"):
        cfg.validate()
    cfg.algorithm.kl_estimator = "k2"
    cfg.validate()


# ---------------------------------------------------------------------------------------------------------
# With ref_weight = 0 the pi_mix log-probs are the policy's own.


def test_mixed_logprobs_ref_weight_zero_matches_plain_log_softmax():
    from nemo_logitavg.ops import mixed_logprobs

    g = torch.Generator().manual_seed(1)
    B, T, V = 4, 5, 11
    policy_logits = torch.randn(B, T, V, generator=g)
    ref_logits = torch.randn(B, T, V, generator=g) * 3
    target = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    adv = torch.randn(B, generator=g)

    plain_logits = policy_logits.clone().requires_grad_()
    plain = torch.log_softmax(plain_logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    old = plain.detach() + 0.3 * torch.randn(B, T, generator=g)  # some tokens clipped, some not

    mix_logits = policy_logits.clone().requires_grad_()
    mixed = mixed_logprobs(mix_logits, ref_logits, target, 0.0)

    for agg in grpo.AGGREGATIONS:
        loss_plain, m_plain = policy_loss(plain, old, adv, mask, agg=agg, max_response_length=T)
        loss_mix, m_mix = policy_loss(mixed, old, adv, mask, agg=agg, max_response_length=T)
        torch.testing.assert_close(loss_mix, loss_plain, rtol=1e-6, atol=1e-6)
        for name in m_plain:
            torch.testing.assert_close(m_mix[name], m_plain[name], rtol=1e-6, atol=1e-6)
    loss_plain, _ = policy_loss(plain, old, adv, mask)
    loss_mix, _ = policy_loss(mixed, old, adv, mask)
    (grad_plain,) = torch.autograd.grad(loss_plain, plain_logits)
    (grad_mix,) = torch.autograd.grad(loss_mix, mix_logits)
    torch.testing.assert_close(grad_mix, grad_plain, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# policy_loss with a behaviour policy (asynchronous GRPO: the decoupled estimator with a truncated weight)

# Behaviour log-probs for the batch above: log(pi_prox / pi_behav) = OLD - BEHAV is, per counted token,
#   (0,0) 0.5  w = e^0.5 = 1.649 < 2 (kept)    (0,1) 1.0  w = e = 2.718 -> 2 (truncated)    (0,2) -0.2  w = 0.819
#   (1,0) 0.0  w = 1                            (1,1) 0.7  w = e^0.7 = 2.014 -> 2 (truncated)
# and padding / masked rows hold anything (NaN included): they must not reach the loss.
BEHAV = [[-1.6, -1.8, -1.5], [-0.9, -1.7, math.nan], [math.nan, -9.0, -0.5]]


@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_truncated_is_weight_matches_its_formula(agg, dual_clip):
    cap = 2.0
    tokens = ref_token_losses(LP, OLD, ADV, MASK, dual_clip=dual_clip)
    weighted = [
        [None if x is None else min(math.exp(OLD[i][j] - BEHAV[i][j]), cap) * x for j, x in enumerate(row)]
        for i, row in enumerate(tokens)
    ]
    expected = ref_aggregate(weighted, agg, max_response_length=4)
    lp, old, adv, mask = batch(torch.float64, requires_grad=True)
    behav = torch.tensor(BEHAV, dtype=torch.float64)
    loss, metrics = policy_loss(lp, old, adv, mask, agg=agg, dual_clip=dual_clip, max_response_length=4,
                                behaviour_logprobs=behav, is_cap=cap)  # fmt: skip
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["is_truncated_fraction"].item() == pytest.approx(2 / 5)
    weights = [min(math.exp(OLD[i][j] - BEHAV[i][j]), cap) for i in range(2) for j in range(3) if MASK[i][j]]
    assert metrics["is_weight_mean"].item() == pytest.approx(sum(weights) / 5, abs=1e-12)
    # The weight is a constant: the gradient is the weight times the unweighted (loop-checked above) gradient.
    loss.backward()
    lp2, _, _, _ = batch(torch.float64, requires_grad=True)
    w = torch.exp(old - behav).nan_to_num(0.0).clamp(max=cap)
    unweighted, _ = policy_loss(lp2, old, adv, mask, agg=agg, dual_clip=dual_clip, max_response_length=4)
    grad_plain = torch.autograd.grad(unweighted, lp2)[0]
    assert torch.isfinite(lp.grad).all()
    torch.testing.assert_close(lp.grad, torch.where(mask, w * grad_plain, 0.0), rtol=1e-12, atol=1e-12)


def test_equal_behaviour_and_proximal_gives_the_synchronous_loss_bit_for_bit():
    gen = torch.Generator().manual_seed(5)
    lp = -torch.rand(6, 9, generator=gen) * 3
    old = lp + 0.3 * torch.randn(6, 9, generator=gen)
    adv, mask = torch.randn(6, generator=gen), torch.rand(6, 9, generator=gen) > 0.3
    for agg in grpo.AGGREGATIONS:
        sync, _ = policy_loss(lp, old, adv, mask, agg=agg, max_response_length=9)
        decoupled, metrics = policy_loss(lp, old, adv, mask, agg=agg, max_response_length=9,
                                         behaviour_logprobs=old.clone(), is_cap=2.0)  # fmt: skip
        assert decoupled.item() == sync.item(), agg
        assert metrics["is_truncated_fraction"].item() == 0.0 and metrics["is_weight_mean"].item() == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"behaviour_logprobs": torch.zeros(2, 2)}, "behaviour_logprobs must have the shape"),
        ({"behaviour_logprobs": torch.zeros(3, 3, dtype=torch.long)}, "behaviour_logprobs must be a floating"),
        ({"behaviour_logprobs": torch.zeros(3, 3), "is_cap": 0.5}, r"is_cap must be a number >= 1 \(algorithm"),
    ],
)
def test_behaviour_bad_inputs(kwargs, match):
    lp, old, adv, mask = batch()
    with pytest.raises(ValueError, match=match):
        policy_loss(lp, old, adv, mask, **kwargs)

"""``mixed_logprobs`` on CUDA in float32 and bfloat16 against a dense float64 computation (docs/design.md §7)."""

from __future__ import annotations

import pytest
import torch

from nemo_logitavg.ops import mixed_logprobs
from tests.gpu import GPU

pytestmark = GPU


def _dense(policy: torch.Tensor, reference: torch.Tensor, target: torch.Tensor, a: float, t: float):
    """float64 log pi_mix(target) and its gradient w.r.t. the policy logits, by autograd of a dense softmax."""
    policy = policy.detach().double().requires_grad_(True)
    mixed = ((1 - a) * policy + a * reference.double()) / t
    logp = torch.log_softmax(mixed, -1).gather(-1, target[..., None])[..., 0]
    (grad,) = torch.autograd.grad(logp.sum(), policy)
    return logp.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_logprobs_on_cuda_matches_float64(dtype):
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    # 2 x 96 tokens over a 32000-word vocabulary, in chunks of 40 tokens (several chunks, a ragged last one).
    shape, vocab, a, t = (2, 96), 32000, 0.3, 0.9
    policy64 = 3 * torch.randn(*shape, vocab, device=device, dtype=torch.float64, generator=gen)
    ref64 = 3 * torch.randn(*shape, vocab, device=device, dtype=torch.float64, generator=gen)
    target = torch.randint(0, vocab, shape, device=device, generator=gen)
    policy = policy64.to(dtype).requires_grad_(True)
    logp = mixed_logprobs(policy, ref64.to(dtype), target, a, t, chunk_size=40)
    assert logp.device.type == "cuda" and logp.dtype == torch.float32
    logp.sum().backward()

    # Against the exact values of the unrounded logits: the tolerance of each input dtype (docs/design.md §7).
    exact, _ = _dense(policy64, ref64, target, a, t)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    err = (logp.double() - exact).abs().max().item()
    # Against the same (rounded) inputs in float64: what the kernel's own float32 arithmetic costs.
    same_inputs, grad64 = _dense(policy.detach(), ref64.to(dtype), target, a, t)
    own = (logp.double() - same_inputs).abs().max().item()
    grad_rel = ((policy.grad.double() - grad64).norm() / grad64.norm()).item()
    print(f"[smoke] mixed_logprobs {dtype}: max|err| vs float64 {err:.2e} (limit {tolerance:g}); "
          f"same inputs {own:.2e}; grad rel {grad_rel:.2e}")  # fmt: skip
    assert err <= tolerance
    assert own <= 1e-5
    # The gradient is written in the logits' dtype: float32 meets 1e-5, bf16 one bf16 rounding (2^-8).
    assert grad_rel <= (1e-5 if dtype == torch.float32 else 2.0**-8)

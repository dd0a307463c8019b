"""mixed_logprobs against a dense float64 computation, megatron-core's cross entropy, and itself."""

from __future__ import annotations

import pytest
import torch

from nemo_logitavg.ops import mixed_logprobs
from tests.distributed import run_distributed


def dense_reference(
    policy: torch.Tensor,
    ref: torch.Tensor,
    target: torch.Tensor,
    ref_weight: float,
    temperature: float = 1.0,
    grad_out: torch.Tensor | None = None,
    true_vocab_size: int | None = None,
):
    """float64 log pi_mix, entropy and d(sum grad_out * logp)/d policy on the full vocabulary."""
    pol = policy.detach().double().requires_grad_()
    mixed = ((1 - ref_weight) * pol + ref_weight * ref.detach().double()) / temperature
    if true_vocab_size is not None:
        mixed = mixed.masked_fill(torch.arange(mixed.shape[-1]) >= true_vocab_size, float("-inf"))
    log_p = torch.log_softmax(mixed, dim=-1)
    logprobs = log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * torch.where(log_p.isinf(), 0.0, log_p)).sum(-1)
    grad_out = torch.ones_like(logprobs) if grad_out is None else grad_out.double()
    (logprobs * grad_out).sum().backward()
    return logprobs.detach(), entropy.detach(), pol.grad


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def make_inputs(shape, vocab, seed=0, scale=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    policy = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)
    ref = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)
    target = torch.randint(0, vocab, shape, generator=gen)
    grad_out = torch.randn(*shape, generator=gen)
    return policy, ref, target, grad_out


@pytest.mark.parametrize("ref_weight,temperature", [(0.5, 1.0), (0.0, 1.0), (0.3, 0.7), (0.8, 1.6), (1.0, 1.0)])
def test_matches_dense_float64(ref_weight, temperature):
    policy, ref, target, grad_out = make_inputs((3, 17), 211)
    pol = policy.clone().requires_grad_()
    logprobs, entropy = mixed_logprobs(pol, ref, target, ref_weight, temperature, return_entropy=True)
    (logprobs * grad_out).sum().backward()
    exp_lp, exp_ent, exp_grad = dense_reference(policy, ref, target, ref_weight, temperature, grad_out)
    assert logprobs.dtype == torch.float32 and logprobs.shape == target.shape
    assert rel_err(logprobs, exp_lp) < 1e-6
    assert (entropy.double() - exp_ent).abs().max() < 1e-5
    if ref_weight == 1.0:
        assert torch.count_nonzero(pol.grad) == 0
    else:
        assert rel_err(pol.grad, exp_grad) < 1e-6
    assert torch.equal(pol.detach(), policy), "inputs must not be modified"


def test_reference_gets_no_gradient():
    policy, ref, target, _ = make_inputs((4,), 50)
    pol, rf = policy.clone().requires_grad_(), ref.clone().requires_grad_()
    mixed_logprobs(pol, rf, target, 0.5).sum().backward()
    assert rf.grad is None and pol.grad is not None


def test_chunked_equals_unchunked():
    policy, ref, target, grad_out = make_inputs((5, 13), 97)
    results = []
    for chunk_size in (None, 1, 7, 1000):
        pol = policy.clone().requires_grad_()
        logprobs, entropy = mixed_logprobs(pol, ref, target, 0.4, 0.9, chunk_size=chunk_size, return_entropy=True)
        (logprobs * grad_out).sum().backward()
        results.append((logprobs, entropy, pol.grad))
    for logprobs, entropy, grad in results[1:]:
        torch.testing.assert_close(logprobs, results[0][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(entropy, results[0][1], rtol=0, atol=1e-6)
        torch.testing.assert_close(grad, results[0][2], rtol=0, atol=1e-7)


def test_bf16_inputs():
    policy, ref, target, grad_out = make_inputs((4, 9), 300, dtype=torch.bfloat16)
    pol = policy.clone().requires_grad_()
    logprobs = mixed_logprobs(pol, ref, target, 0.5, 0.8)
    (logprobs * grad_out).sum().backward()
    exp_lp, _, exp_grad = dense_reference(policy, ref, target, 0.5, 0.8, grad_out)
    assert logprobs.dtype == torch.float32
    assert pol.grad.dtype == torch.bfloat16
    assert (logprobs.double() - exp_lp).abs().max() <= 3e-2
    assert rel_err(pol.grad, exp_grad) < 1e-2


def peaked_bf16_inputs(p_low: float, p_high: float, tokens: int = 512, vocab: int = 300, seed: int = 0):
    """bf16 logits whose pi_mix (ref_weight 0.5, T = 1) puts p_y uniformly in (p_low, p_high) on the target."""
    gen = torch.Generator().manual_seed(seed)
    policy = torch.randn(tokens, vocab, generator=gen, dtype=torch.float64)
    ref = torch.randn(tokens, vocab, generator=gen, dtype=torch.float64)
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    want = p_low + (p_high - p_low) * torch.rand(tokens, generator=gen, dtype=torch.float64)
    mixed = 0.5 * policy + 0.5 * ref
    rest = torch.logsumexp(mixed.scatter(1, target[:, None], float("-inf")), dim=1)
    shift = rest + torch.log(want / (1 - want)) - mixed.gather(1, target[:, None]).squeeze(1)
    policy = policy.scatter_add(1, target[:, None], 2 * shift[:, None])  # the mix halves the policy's shift
    return policy.bfloat16(), ref.bfloat16(), target


@pytest.mark.parametrize("p_low,p_high", [(0.0, 1.0), (0.9995, 0.99999)])
def test_bf16_gradient_within_one_rounding(p_low, p_high):
    """The bf16 gradient is d log pi_mix / d z_pol computed in float32 and rounded once: within 2^-8 (one bf16
    rounding) of float64 elementwise, on the target's column too, where 1 - p_y cancels if formed in bf16."""
    policy, ref, target = peaked_bf16_inputs(p_low, p_high)
    exp_lp, _, exp_grad = dense_reference(policy, ref, target, 0.5)
    p_y = exp_lp.exp()
    # The bf16 logits move p_y a little off the requested range; p_y > 0.999 holds in the peaked case.
    assert p_y.min() >= min(p_low, 0.999) and p_y.max() - p_y.min() > 0.5 * (p_high - p_low)
    bound = 2.0**-8 * exp_grad.abs() + 1e-30  # the floor only for float32-underflowed probabilities
    pol = policy.clone().requires_grad_()
    mixed_logprobs(pol, ref, target, 0.5).sum().backward()
    assert pol.grad.dtype == torch.bfloat16
    err = (pol.grad.double() - exp_grad).abs()
    assert (err <= bound).all(), f"max error {(err / bound).max().item():.3g} bf16 roundings"
    # An upstream gradient multiplies in float32 and rounds once more (the chain rule's product, in bf16).
    grad_out = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    pol = policy.clone().requires_grad_()
    (mixed_logprobs(pol, ref, target, 0.5) * grad_out).sum().backward()
    _, _, exp_grad = dense_reference(policy, ref, target, 0.5, grad_out=grad_out)
    err = (pol.grad.double() - exp_grad).abs()
    assert (err <= 2 * (2.0**-8 * exp_grad.abs() + 1e-30)).all()
    assert rel_err(pol.grad, exp_grad) <= 2.0**-8


def _bf16_peak_worker(tokens: int, vocab: int, chunk_size: int) -> dict:
    from tests.memory import PeakRSS

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    policy = torch.randn(tokens, vocab, generator=gen, dtype=torch.bfloat16).requires_grad_()
    ref = torch.randn(tokens, vocab, generator=gen, dtype=torch.bfloat16)
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    grad_out = torch.randn(tokens, generator=gen)
    with PeakRSS() as rss:  # the kernel's high-water mark, reset here: peaks before the call do not count
        (mixed_logprobs(policy, ref, target, 0.5, chunk_size=chunk_size) * grad_out).sum().backward()
    return {"peak_extra": rss.growth}


def test_bf16_backward_memory_is_one_gradient(monkeypatch):
    """The float32 scaling of a bf16 gradient is done per chunk: peak extra memory is the bf16 gradient plus
    one float32 chunk, not a float32 copy of the whole gradient (which would add 2x the gradient)."""
    # As the other memory checks: a fixed mmap threshold, so freed chunk buffers leave the process and the peak
    # is what was alive at once (glibc's dynamic threshold moves them to the heap, where they pile up).
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    tokens, vocab, chunk = 4096, 8192, 256
    (result,) = run_distributed(_bf16_peak_worker, 1, tokens=tokens, vocab=vocab, chunk_size=chunk)
    grad_bytes, chunk_bytes = tokens * vocab * 2, chunk * vocab * 4
    assert result["peak_extra"] <= grad_bytes + 2 * chunk_bytes + 24 * 2**20, result


def test_gradcheck_float64():
    policy, ref, target, _ = make_inputs((2, 3), 11, dtype=torch.float64)
    pol = policy.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mixed_logprobs(x, ref, target, 0.35, 0.75, chunk_size=2), (pol,))


def test_true_vocab_size_excludes_padding():
    policy, ref, target, grad_out = make_inputs((6,), 64)
    target = target % 50
    pol = policy.clone().requires_grad_()
    logprobs, entropy = mixed_logprobs(pol, ref, target, 0.5, true_vocab_size=50, return_entropy=True)
    (logprobs * grad_out).sum().backward()
    exp_lp, exp_ent, exp_grad = dense_reference(policy[..., :50], ref[..., :50], target, 0.5, grad_out=grad_out)
    assert rel_err(logprobs, exp_lp) < 1e-6
    assert (entropy.double() - exp_ent).abs().max() < 1e-5
    assert rel_err(pol.grad[..., :50], exp_grad) < 1e-6
    assert torch.count_nonzero(pol.grad[..., 50:]) == 0


def test_no_grad_path_matches():
    policy, ref, target, _ = make_inputs((8,), 40)
    with torch.no_grad():
        plain = mixed_logprobs(policy, ref, target, 0.5)
    torch.testing.assert_close(plain, mixed_logprobs(policy.requires_grad_(), ref, target, 0.5).detach())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"ref_logits": torch.zeros(4, 11)}, "same shape"),
        ({"policy_logits": torch.zeros(4, 10, dtype=torch.long)}, "floating-point"),
        ({"target": torch.tensor([0, 1, 2, 10])}, "token id 10"),
        ({"target": torch.tensor([0, -1, 2, 3])}, "token id -1"),
        ({"target": torch.zeros(4)}, "integer token ids"),
        ({"target": torch.zeros(5, dtype=torch.long)}, "target shape"),
        ({"ref_weight": 1.5}, "ref_weight"),
        ({"ref_weight": -0.1}, "ref_weight"),
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"true_vocab_size": 11}, "true_vocab_size"),
        ({"true_vocab_size": 2}, "token id"),
    ],
)
def test_bad_input_errors(kwargs, message):
    args = dict(
        policy_logits=torch.zeros(4, 10),
        ref_logits=torch.zeros(4, 10),
        target=torch.tensor([0, 1, 2, 3]),
        ref_weight=0.5,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        mixed_logprobs(**args)


def test_second_backward_raises_clearly():
    policy, ref, target, _ = make_inputs((3,), 10)
    loss = mixed_logprobs(policy.requires_grad_(), ref, target, 0.5).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


# ---------------------------------------------------------------------------------------------- multi-rank


def _tp_worker(vocab: int) -> dict:
    """Every check on one TP group spanning all ranks; the dense reference runs on the gathered vocabulary."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from nemo_logitavg.parallel import init_parallel, teardown

    world = int(__import__("os").environ["WORLD_SIZE"])
    init_parallel(tensor_parallel_size=world)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = dist.get_rank(group)
    v_local = vocab // world
    cols = slice(rank * v_local, (rank + 1) * v_local)
    policy, ref, target, grad_out = make_inputs((3, 7), vocab, seed=11)
    errors: dict[str, float] = {}

    def run(ref_weight, temperature, chunk_size=None, true_vocab_size=None, dtype=torch.float32, tgt=target):
        pol = policy[..., cols].to(dtype).clone().requires_grad_()
        logprobs, entropy = mixed_logprobs(
            pol,
            ref[..., cols].to(dtype),
            tgt,
            ref_weight,
            temperature,
            tp_group=group,
            chunk_size=chunk_size,
            return_entropy=True,
            true_vocab_size=true_vocab_size,
        )
        (logprobs * grad_out).sum().backward()
        return logprobs, entropy, pol.grad

    for ref_weight, temperature in [(0.5, 1.0), (0.25, 0.6), (0.9, 1.5)]:
        logprobs, entropy, grad = run(ref_weight, temperature, chunk_size=4)
        exp_lp, exp_ent, exp_grad = dense_reference(policy, ref, target, ref_weight, temperature, grad_out)
        key = f"a={ref_weight},T={temperature}"
        errors[f"logprob {key}"] = rel_err(logprobs, exp_lp)
        errors[f"grad {key}"] = rel_err(grad, exp_grad[..., cols])
        errors[f"entropy abs {key}"] = (entropy.double() - exp_ent).abs().max().item()

    # Chunked equals unchunked.
    base = run(0.5, 1.0)
    for chunk_size in (1, 5):
        other = run(0.5, 1.0, chunk_size=chunk_size)
        errors[f"chunk {chunk_size} vs none"] = max(
            (x - y).abs().max().item() for x, y in zip(base, other, strict=True)
        )

    # ref_weight = 0 is megatron-core's vocab-parallel cross entropy, negated (which overwrites its input).
    logprobs, _, grad = run(0.0, 1.0)
    pol = policy[..., cols].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(pol.clone(), target)
    (-loss * grad_out).sum().backward()
    errors["ref_weight=0 vs mcore logprob"] = (logprobs + loss.detach()).abs().max().item()
    errors["ref_weight=0 vs mcore grad"] = rel_err(grad, pol.grad.double())

    # ref_weight = 1 gives zero gradient.
    errors["ref_weight=1 grad max"] = run(1.0, 1.0)[2].abs().max().item()

    # bf16 inputs: compared against float64 on the bf16 values.
    logprobs, _, grad = run(0.5, 0.8, dtype=torch.bfloat16)
    exp_lp, _, _ = dense_reference(policy.bfloat16(), ref.bfloat16(), target, 0.5, 0.8, grad_out)
    errors["bf16 logprob abs"] = (logprobs.double() - exp_lp).abs().max().item()
    errors["bf16 grad dtype ok"] = 0.0 if grad.dtype == torch.bfloat16 else 1.0

    # Vocabulary padding: the true vocabulary ends inside the last shard (or before it, at TP=4).
    true_vocab = vocab - v_local - 3 if world > 1 else vocab - 3
    tgt = target % true_vocab
    logprobs, entropy, grad = run(0.5, 1.0, true_vocab_size=true_vocab, tgt=tgt)
    exp_lp, exp_ent, exp_grad = dense_reference(policy, ref, tgt, 0.5, 1.0, grad_out, true_vocab_size=true_vocab)
    errors["padded logprob"] = rel_err(logprobs, exp_lp)
    errors["padded grad"] = rel_err(grad, exp_grad[..., cols])
    errors["padded entropy abs"] = (entropy.double() - exp_ent).abs().max().item()

    # Shards of unequal size are refused on every rank (no hang).
    if world > 1:
        width = v_local + (1 if rank == world - 1 else 0)
        try:
            mixed_logprobs(
                torch.zeros(2, width), torch.zeros(2, width), torch.zeros(2, dtype=torch.long), 0.5, tp_group=group
            )
            errors["unequal shards refused"] = 1.0
        except ValueError as exc:
            errors["unequal shards refused"] = 0.0 if "different sizes" in str(exc) else 1.0
    teardown()
    return errors


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_tensor_parallel_matches_dense(world_size):
    for rank, errors in enumerate(run_distributed(_tp_worker, world_size, vocab=96)):
        for name, value in errors.items():
            limit = 3e-2 if name.startswith("bf16 logprob") else 1e-5 if "entropy" in name else 1e-6
            if name.startswith("chunk") or name.startswith("ref_weight=1") or name.endswith("ok"):
                limit = 1e-6 if name.startswith("chunk") else 0.0
            if name == "unequal shards refused":
                limit = 0.0
            assert value <= limit, f"rank {rank}/{world_size}: {name} = {value:.3g} > {limit:g}"


@pytest.mark.parametrize("value", [-1e-9, 1.0 + 1e-9, float("nan")])
def test_ref_weight_range_is_checked_once_for_every_user(value: float) -> None:
    """The op, the configs, the bundle and the engines share one range check: outside [0, 1] (or NaN) each names
    its setting; 0 means the reference is not mixed in at all."""
    from nemo_logitavg.models.bundle import write_bundle
    from nemo_logitavg.ops import check_ref_weight, mixes_reference

    with pytest.raises(ValueError, match=r"algorithm\.ref_weight must lie in \[0, 1\]"):
        check_ref_weight(value, "algorithm.ref_weight")
    with pytest.raises(ValueError, match="ref_weight must lie"):
        write_bundle("unused-policy", "unused-reference", value, "unused-out")
    assert (mixes_reference(0.0), mixes_reference(1e-9), mixes_reference(1.0)) == (False, True, True)

"""The torch rollout engine samples from pi_mix and returns log pi_mix (docs/design.md §1, §7), and weight sync.

Models are tiny random Llamas written with transformers (no hub access); a small word-level tokenizer is built
locally with ``tokenizers`` where text matters.
"""

from __future__ import annotations

import pytest
import torch

from nemo_logitavg.ops import mixed_logprobs
from nemo_logitavg.rollout.engine import GenerationRequest, SamplingParams, TorchEngine, sample_tokens
from nemo_logitavg.seeds import sequence_seed
from tests.tiny_models import assert_samples_follow_pi_mix, hf_logits, make_spread_llama

VOCAB = 48  # small, so that a chi-square test over the whole vocabulary has power
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
)  # fmt: skip


def make_tiny_llama(path, seed: int, tokenizer: bool = False, **overrides) -> str:
    make_spread_llama(path, seed, {**TINY, **overrides})
    if tokenizer:
        make_tokenizer(path, overrides.get("vocab_size", VOCAB))
    return str(path)


def make_tokenizer(path, vocab_size: int = VOCAB) -> None:
    """A word-level tokenizer: ids 0-2 are <unk>, <s>, </s> (Llama's bos=1, eos=2); id k >= 3 is the word "wk"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{k}": k for k in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two OpenMP threads on a shared 2-core machine make each tiny matmul ~1000x slower (spin contention).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_models")
    return {
        "policy": make_tiny_llama(root / "policy", seed=1, tokenizer=True),
        "reference": make_tiny_llama(root / "reference", seed=2),
        "policy2": make_tiny_llama(root / "policy2", seed=3),
        "other_shape": make_tiny_llama(root / "other_shape", seed=4, hidden_size=48),
    }


_engines: dict = {}


def engine_for(model_dirs, ref_weight: float) -> TorchEngine:
    key = (model_dirs["policy"], ref_weight)
    if key not in _engines:
        _engines[key] = TorchEngine(model_dirs["policy"], model_dirs["reference"], ref_weight)
    return _engines[key]


# Sample size. For a true distribution p and the tested q with total-variation distance d, the chi-square
# noncentrality is lambda = N * sum((p - q)^2 / q) >= N * (sum|p - q|)^2 = N * (2d)^2 (Cauchy-Schwarz, sum q = 1).
# With d = 0.02 and N = 50_000, lambda >= 80; at <= 47 degrees of freedom the alpha = 1e-3 critical value is
# 82.7 and the noncentral chi-square has mean >= 127 and sd ~20, so a 2% error is detected with power ~0.98.
SAMPLES = 50_000
CONTEXT = [5, 17, 33, 9, 41]


@pytest.mark.slow
@pytest.mark.parametrize("ref_weight", [0.5, 0.8])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_next_token_frequencies_match_pi_mix(model_dirs, ref_weight, temperature):
    engine = engine_for(model_dirs, ref_weight)
    params = SamplingParams(max_tokens=1, temperature=temperature, ignore_eos=True)
    (samples,) = engine.generate([GenerationRequest(CONTEXT, params, n=SAMPLES, seed=1234)])
    assert_samples_follow_pi_mix(samples, model_dirs, CONTEXT, ref_weight, temperature, VOCAB)


def _teacher_forced(model_dirs, policy_key, prompt, tokens, ref_weight, temperature):
    ids = prompt + tokens
    z_pol = hf_logits(model_dirs[policy_key], ids)[len(prompt) - 1 : -1]
    z_ref = hf_logits(model_dirs["reference"], ids)[len(prompt) - 1 : -1]
    return mixed_logprobs(z_pol, z_ref, torch.tensor(tokens), ref_weight, temperature=temperature)


def test_logprobs_equal_mixed_logprobs(model_dirs):
    engine = engine_for(model_dirs, 0.5)
    requests = [
        GenerationRequest([3, 4, 5, 6, 7, 8, 9], SamplingParams(max_tokens=20, temperature=0.8), n=3, seed=1),
        GenerationRequest([11], SamplingParams(max_tokens=20, temperature=1.0, top_p=0.7), n=2, seed=2),
        GenerationRequest([12, 13, 14], SamplingParams(max_tokens=12, temperature=1.7), n=2, seed=3),
        GenerationRequest([20, 21], SamplingParams(max_tokens=15, temperature=0.0), n=1, seed=4),
    ]
    outputs = engine.generate(requests)
    checked = 0
    for request, completions in zip(requests, outputs, strict=True):
        assert len(completions) == request.n
        for c in completions:
            assert 1 <= len(c.token_ids) == len(c.logprobs) <= request.params.max_tokens
            assert c.finish_reason in ("stop", "length")
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in engine.eos_token_ids
            temperature = request.params.temperature or 1.0  # greedy: log pi_mix at T = 1
            expected = _teacher_forced(model_dirs, "policy", request.prompt_token_ids, c.token_ids, 0.5, temperature)
            assert (torch.tensor(c.logprobs) - expected).abs().max() < 1e-4
            checked += len(c.token_ids)
    assert checked > 40
    # Greedy picks the argmax of the mixed logits at every step.
    greedy = outputs[3][0]
    ids = requests[3].prompt_token_ids + greedy.token_ids
    m = 0.5 * hf_logits(model_dirs["policy"], ids) + 0.5 * hf_logits(model_dirs["reference"], ids)
    assert m[len(requests[3].prompt_token_ids) - 1 : -1].argmax(-1).tolist() == greedy.token_ids


def test_same_seed_same_completions_alone_or_batched(model_dirs):
    engine = engine_for(model_dirs, 0.5)
    params = SamplingParams(max_tokens=16, temperature=1.0)
    requests = [
        GenerationRequest([3, 4, 5], params, n=4, seed=10),
        GenerationRequest([30, 31, 32, 33, 34, 35, 36, 37], SamplingParams(max_tokens=16, top_p=0.8), n=3, seed=11),
        GenerationRequest([7], params, n=2, seed=12),
    ]
    batched = engine.generate(requests)
    for request, together in zip(requests, batched, strict=True):
        (alone,) = engine.generate([request])
        assert [c.token_ids for c in alone] == [c.token_ids for c in together]
        for a, b in zip(alone, together, strict=True):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-5
    # Samples differ from each other, and a batch split into chunks gives the same result.
    assert len({tuple(c.token_ids) for c in batched[0]}) > 1
    engine.max_batch_size = 2
    try:
        chunked = engine.generate(requests)
    finally:
        engine.max_batch_size = 256
    assert [[c.token_ids for c in g] for g in chunked] == [[c.token_ids for c in g] for g in batched]


def test_sample_tokens_row_independent_and_top_p():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=gen) * 2
    temps = torch.tensor([1.0, 0.5, 0.0, 1.0, 2.0, 1.0])
    top_ps = torch.tensor([1.0, 0.3, 1.0, 0.5, 1.0, 1e-6])

    def gens():
        return [torch.Generator().manual_seed(sequence_seed(9, i)) for i in range(6)]

    tokens, logps = sample_tokens(logits, temps, top_ps, gens())
    for i in range(6):  # each row alone gives the same token
        g = gens()[i]
        alone, _ = sample_tokens(logits[i : i + 1], temps[i : i + 1], top_ps[i : i + 1], [g])
        assert int(alone[0]) == int(tokens[i])
    assert int(tokens[2]) == int(logits[2].argmax())  # greedy
    assert int(tokens[5]) == int(logits[5].argmax())  # tiny top_p keeps only the top token
    expected = torch.log_softmax(logits / torch.where(temps == 0, 1.0, temps)[:, None], -1)
    assert torch.allclose(logps, expected.gather(1, tokens[:, None])[:, 0])
    # top_p = 0.5: only tokens inside the nucleus are ever drawn.
    p = torch.softmax(logits[3], -1)
    sorted_p, order = p.sort(descending=True)
    nucleus = set(order[: int(((sorted_p.cumsum(0) - sorted_p) < 0.5).sum())].tolist())
    draws = [
        int(sample_tokens(logits[3:4], temps[3:4], top_ps[3:4], [torch.Generator().manual_seed(s)])[0][0])
        for s in range(300)
    ]
    assert set(draws) <= nucleus and len(set(draws)) == len(nucleus) > 1


def test_stops_text_and_token_id_mode(model_dirs):
    engine = engine_for(model_dirs, 0.5)
    assert engine.has_tokenizer
    assert engine.encode("w5 w17") == [5, 17]
    assert engine.decode([5, 17, 2]) == "w5 w17"
    prompt = [5, 17, 33]
    (free,) = engine.generate([GenerationRequest(prompt, SamplingParams(max_tokens=30, ignore_eos=True), seed=5)])
    assert free[0].finish_reason == "length" and len(free[0].token_ids) == 30
    assert free[0].text == engine.decode(free[0].token_ids)
    # A stop token id ends the completion at its first occurrence, kept in token_ids, not in text.
    stop_id = free[0].token_ids[6]
    first = free[0].token_ids.index(stop_id)
    params = SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=(stop_id,))
    (stopped,) = engine.generate([GenerationRequest(prompt, params, seed=5)])
    assert stopped[0].token_ids == free[0].token_ids[: first + 1] and stopped[0].finish_reason == "stop"
    assert stopped[0].text == engine.decode(free[0].token_ids[:first])
    # A stop string cuts the text before it.
    word = f"w{stop_id}"
    params = SamplingParams(max_tokens=30, ignore_eos=True, stop=(word,))
    (cut,) = engine.generate([GenerationRequest(prompt, params, seed=5)])
    assert cut[0].finish_reason == "stop" and word not in cut[0].text
    assert free[0].text.startswith(cut[0].text) and cut[0].token_ids == stopped[0].token_ids
    # Invalid requests are refused before decoding.
    for bad in ([VOCAB], [-1], []):
        with pytest.raises(ValueError):
            engine.generate([GenerationRequest(bad, SamplingParams())])
    # Without tokenizer files: token-id mode.
    ids_only = TorchEngine(model_dirs["policy2"], model_dirs["reference"], 0.5)
    assert not ids_only.has_tokenizer
    (out,) = ids_only.generate([GenerationRequest(prompt, SamplingParams(max_tokens=3, ignore_eos=True))])
    assert out[0].text == "" and len(out[0].token_ids) == 3
    with pytest.raises(ValueError, match="token-id mode"):
        ids_only.generate([GenerationRequest(prompt, SamplingParams(stop=("w3",)))])


def test_load_policy_replaces_only_the_policy(model_dirs):
    engine = TorchEngine(model_dirs["policy"], model_dirs["reference"], 0.3)
    request = GenerationRequest([8, 9, 10], SamplingParams(max_tokens=10, temperature=0.9, ignore_eos=True), seed=3)
    with pytest.raises(ValueError, match="another model"):
        engine.load_policy(model_dirs["other_shape"], 5)
    assert engine.policy_step == 0
    engine.load_policy(model_dirs["policy2"], 7)
    assert engine.policy_step == 7 and engine.info()["policy_step"] == 7
    (out,) = engine.generate([request])
    expected = _teacher_forced(model_dirs, "policy2", request.prompt_token_ids, out[0].token_ids, 0.3, 0.9)
    assert (torch.tensor(out[0].logprobs) - expected).abs().max() < 1e-4


def test_policy_alone_engine(model_dirs):
    with pytest.raises(ValueError, match="reference"):
        TorchEngine(model_dirs["policy"], None, 0.5)
    engine = TorchEngine(model_dirs["policy"], None, 0.0)
    prompt = [4, 5]
    (out,) = engine.generate([GenerationRequest(prompt, SamplingParams(max_tokens=8, ignore_eos=True), seed=1)])
    ids = prompt + out[0].token_ids
    expected = torch.log_softmax(hf_logits(model_dirs["policy"], ids)[1:-1], -1)
    expected = expected.gather(1, torch.tensor(out[0].token_ids)[:, None])[:, 0]
    assert (torch.tensor(out[0].logprobs) - expected).abs().max() < 1e-4

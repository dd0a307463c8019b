"""Tiny Hugging Face models and a character-level tokenizer, made locally for tests (nothing downloads)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = string.digits + string.ascii_lowercase + " +-*/=().,:?\\{}^_$"


def save_char_tokenizer(path: str) -> int:
    """A character-level fast tokenizer (pad 0, bos 1, eos 2, unk 3) saved into ``path``; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    return len(vocab)


def make_fake_hf_dir(path, tag: str) -> str:
    """A directory that passes for a Hugging Face model by its files alone (a config.json and a weights file whose
    bytes name ``tag``), for tests of file layouts that never load it."""
    path = Path(path)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 100, "tag": tag}))
    (path / "model.safetensors").write_bytes(b"weights " + tag.encode())
    return str(path)


def make_llama_with_tokenizer(
    path: str, seed: int, vocab_size: int = 100, hidden_size: int = 64, num_hidden_layers: int = 2
) -> str:
    """A random tiny Llama (GQA) plus the character tokenizer, as one Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    size = save_char_tokenizer(path)
    assert size <= vocab_size
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


TINY = dict(
    vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
)  # fmt: skip


def make_hf_llama(path, seed: int, tie: bool = False) -> str:
    """A randomly initialised tiny Llama saved with transformers (float32, safetensors)."""
    return make_spread_llama(path, seed, {**TINY, "tie_word_embeddings": tie}, std=0.2)


def make_spread_llama(path, seed: int, shape: dict, std: float = 0.25) -> str:
    """A random Llama of ``shape`` (LlamaConfig keys), weights ~ N(0, std) and norms ~ U(0.8, 1.2) so that its
    next-token distribution is far from uniform (transformers' own init gives near-uniform logits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, std) if param.dim() > 1 else param.uniform_(0.8, 1.2)
    model.save_pretrained(path)
    return str(path)


def make_tiny_family(path, model_type: str, tied: bool, seed: int = 0) -> str:
    """A random tiny model of a Hugging Face ``model_type`` (``llama``, ``qwen2``, ...) built and saved by
    transformers itself (``TINY``'s shape, 2 layers, float32 safetensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY, "num_hidden_layers": 2, "tie_word_embeddings": tied})
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


_hf_models: dict = {}


def hf_logits(path: str, ids: list[int]) -> torch.Tensor:
    """Full-sequence logits ``[L, V]`` float32 from transformers (independent of the engines); models cached."""
    from transformers import AutoModelForCausalLM

    if path not in _hf_models:
        _hf_models[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return _hf_models[path](input_ids=torch.tensor([ids])).logits[0].float()


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; categories with expected count < 5 are pooled into one bin."""
    n = counts.sum().double()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def assert_samples_follow_pi_mix(
    samples, model_dirs: dict, context: list[int], ref_weight: float, temperature: float, vocab: int
) -> None:
    """One-token completions of ``context`` from an engine follow pi_mix computed from transformers logits
    (chi-square), carry log pi_mix within 1e-4, and the same test rejects the policy alone and pi_mix with 2% of
    its mass moved from its most likely token to the second (total variation exactly 0.02, near the worst case).
    """
    tokens = torch.tensor([s.token_ids[0] for s in samples])
    returned = torch.tensor([s.logprobs[0] for s in samples])
    z_pol = hf_logits(model_dirs["policy"], context)[-1].double()
    z_ref = hf_logits(model_dirs["reference"], context)[-1].double()
    pi_mix = torch.softmax(((1 - ref_weight) * z_pol + ref_weight * z_ref) / temperature, -1)
    counts = torch.bincount(tokens, minlength=vocab)
    assert chi_square_pvalue(counts, pi_mix) > 1e-3
    assert (returned.double() - pi_mix.log()[tokens]).abs().max() < 1e-4
    assert chi_square_pvalue(counts, torch.softmax(z_pol / temperature, -1)) < 1e-3
    top2 = pi_mix.topk(2).indices
    shifted = pi_mix.clone()
    shifted[top2[0]] -= 0.02
    shifted[top2[1]] += 0.02
    assert chi_square_pvalue(counts, shifted) < 1e-3

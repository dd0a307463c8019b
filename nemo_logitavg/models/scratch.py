"""A model from nothing: a sentencepiece tokenizer trained on a corpus and a randomly initialised Llama, saved
together as one Hugging Face directory (what the SFT recipe then fine-tunes)."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import sentencepiece as spm
import torch

# sentencepiece ids of the specials; the Hugging Face tokenizer keeps them.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


@dataclass
class ScratchModelConfig:
    """Shape of the from-scratch Llama (a Llama-3-style decoder: RMSNorm, SwiGLU, RoPE, GQA)."""

    vocab_size: int = 256  # sentencepiece vocabulary trained on the corpus
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int) -> None:
    """Train a BPE sentencepiece model on ``texts`` (digits split one per token, whitespace kept verbatim) and
    save it into ``out_dir`` as a Hugging Face Llama tokenizer (``tokenizer.json``; BOS added, EOS appended by
    the recipes)."""
    # transformers takes ~1 s to import: the config, which imports this module for its schema, must not pay it
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        split_digits=True, character_coverage=1.0, byte_fallback=False, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", pad_id=PAD_ID, unk_id=UNK_ID,
        bos_id=BOS_ID, eos_id=EOS_ID, minloglevel=2,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as fh:
            fh.write(model.getvalue())
        tokenizer = LlamaTokenizer.from_pretrained(
            tmp, pad_token="<pad>", add_prefix_space=False, legacy=False, add_bos_token=True
        )
    tokenizer.save_pretrained(out_dir)


def init_llama(out_dir: str, cfg: ScratchModelConfig, seed: int) -> None:
    """Save a randomly initialised float32 Llama with ``cfg``'s shape into ``out_dir`` (beside its tokenizer)."""
    # transformers' Llama takes ~2 s to import: the config, which imports this module for its schema, must not pay it
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=False, torch_dtype="float32",
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out_dir)

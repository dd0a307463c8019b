"""Build a Llama-family decoder (RMSNorm, SwiGLU, rotary, grouped-query attention) as a megatron-core GPTModel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-family decoder; names follow Hugging Face's ``LlamaConfig``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron's padding: the smallest multiple of ``divisible_by * tensor_parallel_size`` >= vocab_size."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def _layer_spec():
    # Transformer Engine's fused layers when they import (NGC container, GPU); megatron's local layers otherwise.
    try:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        if torch.cuda.is_available():
            return get_gpt_layer_with_transformer_engine_spec()
    except (ImportError, RuntimeError, OSError):  # TE raises RuntimeError on CPU-only machines
        pass
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm")


def build_gpt_model(
    cfg: LlamaConfig,
    tensor_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool = True,
    post_process: bool = True,
    make_vocab_size_divisible_by: int = 128,
):
    """A megatron-core ``GPTModel`` for ``cfg`` on this rank's TP shard.

    Weights are initialised on the CPU from the full matrices and then split, so a given
    ``torch.manual_seed`` yields the same model at every TP size. The output layer returns
    vocab-parallel logits ``[batch, seq, padded_vocab / TP]``.

    Raises:
        ValueError: when ``tensor_parallel_size`` does not divide the attention heads or the query groups.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    for what, count in (
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
    ):
        if count % tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} does not divide {what}={count}")
    config = TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel_size,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=True,
    )
    return GPTModel(
        config,
        _layer_spec(),
        vocab_size=padded_vocab_size(cfg.vocab_size, tensor_parallel_size, make_vocab_size_divisible_by),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
    )

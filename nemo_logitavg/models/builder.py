"""Build a Llama-family decoder (RMSNorm, SwiGLU, rotary, grouped-query attention) as a megatron-core GPTModel."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> LlamaConfig:
        """Read a Hugging Face ``config.json`` (a directory, the file itself, or its parsed dict).

        Both the transformers 4 layout (``rope_theta``, ``rope_scaling``) and the 5 layout
        (``rope_parameters``) are read. Only what the builder can reproduce exactly is accepted.

        Raises:
            ValueError: for an architecture other than ``LlamaForCausalLM`` / ``model_type`` other than
                ``llama`` (the message names it and the file), or a Llama option the builder does not
                implement (attention or MLP biases, rope scaling, a non-SiLU activation, a custom head_dim).
            FileNotFoundError: when the directory has no ``config.json``.
        """
        if isinstance(path_or_dict, Mapping):
            hf, source = dict(path_or_dict), "the given config dict"
        else:
            source = os.fspath(path_or_dict)
            if os.path.isdir(source):
                source = os.path.join(source, "config.json")
            if not os.path.isfile(source):
                raise FileNotFoundError(f"no Hugging Face config.json at {source}")
            with open(source, encoding="utf-8") as f:
                hf = json.load(f)

        def refuse(what: str) -> ValueError:
            return ValueError(f"{source}: {what}; supported: LlamaForCausalLM (model_type 'llama')")

        architectures = hf.get("architectures") or []
        model_type = hf.get("model_type")
        for arch in architectures:
            if arch == "Qwen2ForCausalLM":
                raise refuse("architecture Qwen2ForCausalLM is not supported (its q/k/v projections have biases)")
            if arch != "LlamaForCausalLM":
                raise refuse(f"architecture {arch} is not supported")
        if model_type != "llama":
            raise refuse(f"model_type {model_type!r} is not supported")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise refuse(f"{flag}=true is not supported (the builder has no linear biases)")
        if hf.get("hidden_act", "silu") != "silu":
            raise refuse(f"hidden_act={hf['hidden_act']!r} is not supported (only silu)")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim * heads != hf["hidden_size"]:
            raise refuse(f"head_dim={head_dim} != hidden_size / num_attention_heads is not supported")
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise refuse(f"rope scaling of type {rope_type!r} is not supported (only unscaled rotary embeddings)")
        rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        if not rope_theta.is_integer():  # megatron-core takes an integer rotary base
            raise refuse(f"a non-integer rope_theta={rope_theta} is not supported")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=rope_theta,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )


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
    pipeline_parallel_size: int = 1,
):
    """A megatron-core ``GPTModel`` for ``cfg`` on this rank's TP shard and PP stage.

    Weights are initialised on the CPU from the full matrices and then split, so a given
    ``torch.manual_seed`` yields the same model at every TP size (real runs load weights instead). The last
    stage returns vocab-parallel logits ``[batch, seq, padded_vocab / TP]``; other stages return hidden
    states ``[seq, batch, hidden]``. Under PP each stage builds ``num_hidden_layers / PP`` layers.

    Raises:
        ValueError: when ``tensor_parallel_size`` does not divide the attention heads or the query groups, or
            ``pipeline_parallel_size`` does not divide the layers.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    for what, count in (
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
    ):
        if count % tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} does not divide {what}={count}")
    if cfg.num_hidden_layers % pipeline_parallel_size:
        raise ValueError(
            f"pipeline_parallel_size={pipeline_parallel_size} does not divide num_hidden_layers={cfg.num_hidden_layers}"
        )
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
        pipeline_model_parallel_size=pipeline_parallel_size,
        pipeline_dtype=params_dtype,
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

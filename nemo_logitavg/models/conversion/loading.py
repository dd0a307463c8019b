"""Weights into a live megatron-core ``GPTModel``: a shard in megatron names (either layer spec), or this rank's
part of a Hugging Face directory; with the checks that the model was built for the weights' config.

Call under ``parallel.init_parallel``: the TP/PP ranks come from megatron's parallel state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from nemo_logitavg.models.builder import LlamaConfig
from nemo_logitavg.models.conversion.hf_files import read_hf_state
from nemo_logitavg.models.conversion.mapping import (
    EXTRA_STATE,
    TE_FUSED_NORMS,
    check_hf_state,
    hf_to_mcore_state_dict,
    listing,
)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def model_layers(model: torch.nn.Module) -> list[int]:
    """Global (0-based) numbers of the decoder layers this stage's model holds."""
    decoder = getattr(model, "decoder", None)
    return [layer.layer_number - 1 for layer in decoder.layers] if decoder is not None else []


def parallel_ranks() -> tuple[int, int, int, int]:
    """This rank's (TP rank, TP size, PP rank, PP size) from megatron's parallel state."""
    # megatron-core is imported where used: importing it takes seconds, and the offline converter never needs it.
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_rank(),
        ps.get_pipeline_model_parallel_world_size(),
    )


def check_model_matches(model: torch.nn.Module, cfg: LlamaConfig, source: str) -> None:
    """Raise ValueError naming every setting in which ``model`` (a GPTModel, unwrapped) was not built for ``cfg``."""
    config = model.config
    pairs = {
        "hidden_size": (config.hidden_size, cfg.hidden_size),
        "ffn_hidden_size / intermediate_size": (config.ffn_hidden_size, cfg.intermediate_size),
        "num_layers / num_hidden_layers": (config.num_layers, cfg.num_hidden_layers),
        "num_attention_heads": (config.num_attention_heads, cfg.num_attention_heads),
        "num_query_groups / num_key_value_heads": (
            config.num_query_groups or config.num_attention_heads,
            cfg.num_key_value_heads,
        ),
        "layernorm_epsilon / rms_norm_eps": (config.layernorm_epsilon, cfg.rms_norm_eps),
        "add_qkv_bias / qkv_bias": (bool(config.add_qkv_bias), cfg.qkv_bias),
        "rope_scaling / rope_scaling_factor set": (
            bool(getattr(model, "rotary_scaling", False)),
            cfg.rope_scaling_factor is not None,
        ),
        "share_embeddings_and_output_weights / tie_word_embeddings": (
            model.share_embeddings_and_output_weights,
            cfg.tie_word_embeddings,
        ),
    }
    if getattr(model, "rotary_base", None) is not None:
        pairs["rotary_base / rope_theta"] = (float(model.rotary_base), cfg.rope_theta)
    wrong = [f"{name}: model {ours} vs {theirs}" for name, (ours, theirs) in pairs.items() if ours != theirs]
    inv_freq = getattr(getattr(model, "rotary_pos_emb", None), "inv_freq", None)
    if inv_freq is not None and not wrong:
        expected = _rotary_inv_freq(cfg)
        if inv_freq.shape != expected.shape or not torch.allclose(inv_freq.detach().cpu().float(), expected):
            wrong.append("rotary frequencies (rope_theta / rope_scaling_factor) differ")
    if model.vocab_size < cfg.vocab_size:
        wrong.append(f"vocab_size: model {model.vocab_size} < {cfg.vocab_size}")
    if wrong:
        raise ValueError(f"the model was not built for {source}: " + "; ".join(wrong))


def _rotary_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """megatron-core's rotary inverse frequencies for ``cfg``: ``[head_dim / 2]`` float32 on the CPU, llama3 scaling
    included."""
    # megatron-core is imported where used: importing it takes seconds, and the offline converter never needs it.
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rotary = RotaryEmbedding(
        kv_channels=cfg.head_dim,
        rotary_percent=1.0,
        rotary_base=int(cfg.rope_theta),
        rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor if cfg.rope_scaling_factor is not None else 8.0,
        use_cpu_initialization=True,
    )
    return rotary.inv_freq


def load_mcore_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a shard in local-spec names into ``model`` strictly (any spec; ``_extra_state`` kept from the model).

    Raises:
        ValueError: naming the keys the model has and the shard lacks, the keys it has that the model lacks, and
            any shape mismatch.
    """
    model = unwrap(model)
    own = model.state_dict()
    fused = {local: te for local, te in TE_FUSED_NORMS if any(k.endswith(te) for k in own)}
    renamed = {}
    for name, value in state.items():
        for local, te in fused.items():
            if name.endswith(local):
                name = name[: -len(local)] + te
        renamed[name] = value
    missing = {k for k in own if k not in renamed and not k.endswith(EXTRA_STATE)}
    unexpected = {k for k in renamed if k not in own}
    shapes = {
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in renamed.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    }
    problems = [
        f"{what}: {listing(keys)}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if keys
    ]
    if problems:
        raise ValueError("state dict does not fit the megatron model: " + "; ".join(problems))
    extra = {k: v for k, v in own.items() if k.endswith(EXTRA_STATE) and k not in renamed}
    model.load_state_dict({**renamed, **extra}, strict=True)


def load_hf_into_mcore(model: torch.nn.Module, hf_dir: str | os.PathLike) -> LlamaConfig:
    """Load this rank's shard of a Hugging Face Llama directory into a ``GPTModel`` built for it.

    Call under ``init_parallel`` (the TP/PP ranks come from megatron's parallel state) on a model from
    ``build_gpt_model(LlamaConfig.from_hf(hf_dir), ...)``. Returns that config.

    Raises:
        ValueError: unsupported architecture, a model built for another config, or keys that do not match
            (named). FileNotFoundError: no config.json or safetensors weights.
    """
    model = unwrap(model)
    cfg = LlamaConfig.from_hf(hf_dir)
    check_model_matches(model, cfg, os.fspath(hf_dir))
    tp_rank, tp_size, pp_rank, pp_size = parallel_ranks()
    hf_state = read_hf_state(hf_dir)
    check_hf_state(hf_state, cfg, os.fspath(hf_dir))
    state = hf_to_mcore_state_dict(
        hf_state, cfg, tp_rank, tp_size, pp_rank, pp_size, padded_vocab=model.vocab_size, layers=model_layers(model)
    )
    load_mcore_state_dict(model, state)
    return cfg

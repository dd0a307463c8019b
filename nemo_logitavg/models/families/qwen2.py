"""Qwen2 (``Qwen2ForCausalLM``): Llama's decoder with biases on the q/k/v projections (none on o_proj or the MLP).

Only full attention in every layer is built (the builder refuses sliding windows).
"""

from __future__ import annotations

from nemo_logitavg.models.families.table import (
    ATTENTION,
    EMBED_TOKENS,
    FINAL_NORM,
    LM_HEAD,
    MLP,
    Layout,
    ModelFamily,
    Weight,
)

QWEN2 = ModelFamily(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    first=(EMBED_TOKENS,),
    layer=(
        *ATTENTION,
        Weight("self_attn.q_proj.bias", "self_attention.linear_qkv.bias", ("q",), Layout.QKV, "q"),
        Weight("self_attn.k_proj.bias", "self_attention.linear_qkv.bias", ("kv",), Layout.QKV, "k"),
        Weight("self_attn.v_proj.bias", "self_attention.linear_qkv.bias", ("kv",), Layout.QKV, "v"),
        *MLP,
    ),
    last=(FINAL_NORM, LM_HEAD),
    export_config=lambda cfg: {
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_hidden_layers,
        "layer_types": ["full_attention"] * cfg.num_hidden_layers,
    },
)

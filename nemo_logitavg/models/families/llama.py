"""Llama 2 / 3.x (``LlamaForCausalLM``): RMSNorm, SwiGLU, rotary, grouped-query attention, no biases.

Llama 3.x's ``llama3`` rope scaling changes no tensor (the builder reads it from the config).
"""

from __future__ import annotations

from nemo_logitavg.models.families.table import EMBED_TOKENS, FINAL_NORM, LM_HEAD, Layout, ModelFamily, Weight

LLAMA = ModelFamily(
    model_type="llama",
    architecture="LlamaForCausalLM",
    first=(EMBED_TOKENS,),
    layer=(
        Weight("input_layernorm.weight", "input_layernorm.weight", ("hidden",), Layout.REPLICATED),
        Weight("self_attn.q_proj.weight", "self_attention.linear_qkv.weight", ("q", "hidden"), Layout.QKV, "q"),
        Weight("self_attn.k_proj.weight", "self_attention.linear_qkv.weight", ("kv", "hidden"), Layout.QKV, "k"),
        Weight("self_attn.v_proj.weight", "self_attention.linear_qkv.weight", ("kv", "hidden"), Layout.QKV, "v"),
        Weight("self_attn.o_proj.weight", "self_attention.linear_proj.weight", ("hidden", "q"), Layout.SPLIT_COLUMNS),
        Weight("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", ("hidden",), Layout.REPLICATED),
        Weight("mlp.gate_proj.weight", "mlp.linear_fc1.weight", ("ffn", "hidden"), Layout.GATE_UP, "gate"),
        Weight("mlp.up_proj.weight", "mlp.linear_fc1.weight", ("ffn", "hidden"), Layout.GATE_UP, "up"),
        Weight("mlp.down_proj.weight", "mlp.linear_fc2.weight", ("hidden", "ffn"), Layout.SPLIT_COLUMNS),
    ),
    last=(FINAL_NORM, LM_HEAD),
    export_config=lambda cfg: {"attention_bias": False, "mlp_bias": False},
    # Llama's attention_bias covers o_proj too, unlike megatron's add_qkv_bias.
    refused_flags=(("attention_bias", "q/k/v and o_proj biases"), ("mlp_bias", "MLP biases")),
)

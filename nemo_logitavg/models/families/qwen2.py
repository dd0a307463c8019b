"""Qwen2 (``Qwen2ForCausalLM``): Llama's decoder with biases on the q/k/v projections (none on o_proj or the MLP).

Only full attention in every layer is built (the builder refuses sliding windows).
"""

from __future__ import annotations

from nemo_logitavg.models.families.table import EMBED_TOKENS, FINAL_NORM, LM_HEAD, Layout, ModelFamily, Weight

QWEN2 = ModelFamily(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    first=(EMBED_TOKENS,),
    layer=(
        Weight("input_layernorm.weight", "input_layernorm.weight", ("hidden",), Layout.REPLICATED),
        Weight("self_attn.q_proj.weight", "self_attention.linear_qkv.weight", ("q", "hidden"), Layout.QKV, "q"),
        Weight("self_attn.k_proj.weight", "self_attention.linear_qkv.weight", ("kv", "hidden"), Layout.QKV, "k"),
        Weight("self_attn.v_proj.weight", "self_attention.linear_qkv.weight", ("kv", "hidden"), Layout.QKV, "v"),
        Weight("self_attn.o_proj.weight", "self_attention.linear_proj.weight", ("hidden", "q"), Layout.SPLIT_COLUMNS),
        Weight("self_attn.q_proj.bias", "self_attention.linear_qkv.bias", ("q",), Layout.QKV, "q"),
        Weight("self_attn.k_proj.bias", "self_attention.linear_qkv.bias", ("kv",), Layout.QKV, "k"),
        Weight("self_attn.v_proj.bias", "self_attention.linear_qkv.bias", ("kv",), Layout.QKV, "v"),
        Weight("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", ("hidden",), Layout.REPLICATED),
        Weight("mlp.gate_proj.weight", "mlp.linear_fc1.weight", ("ffn", "hidden"), Layout.GATE_UP, "gate"),
        Weight("mlp.up_proj.weight", "mlp.linear_fc1.weight", ("ffn", "hidden"), Layout.GATE_UP, "up"),
        Weight("mlp.down_proj.weight", "mlp.linear_fc2.weight", ("hidden", "ffn"), Layout.SPLIT_COLUMNS),
    ),
    last=(FINAL_NORM, LM_HEAD),
    export_config=lambda cfg: {
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_hidden_layers,
        "layer_types": ["full_attention"] * cfg.num_hidden_layers,
    },
)

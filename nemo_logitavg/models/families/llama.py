"""Llama 2 / 3.x (``LlamaForCausalLM``): RMSNorm, SwiGLU, rotary, grouped-query attention, no biases.

Llama 3.x's ``llama3`` rope scaling changes no tensor (the builder reads it from the config).
"""

from __future__ import annotations

from nemo_logitavg.models.families.table import ATTENTION, EMBED_TOKENS, FINAL_NORM, LM_HEAD, MLP, ModelFamily

LLAMA = ModelFamily(
    model_type="llama",
    architecture="LlamaForCausalLM",
    first=(EMBED_TOKENS,),
    layer=(*ATTENTION, *MLP),
    last=(FINAL_NORM, LM_HEAD),
    export_config=lambda cfg: {"attention_bias": False, "mlp_bias": False},
    # Llama's attention_bias covers o_proj too, unlike megatron's add_qkv_bias.
    refused_flags=(("attention_bias", "q/k/v and o_proj biases"), ("mlp_bias", "MLP biases")),
)

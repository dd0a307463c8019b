"""Megatron-Core models: the Llama-family builder, the model families' mapping tables (``families/``), the Hugging Face
conversion (``conversion/``) and the actor."""

from nemo_logitavg.models.builder import LlamaConfig, build_gpt_model, padded_vocab_size

__all__ = ["LlamaConfig", "build_gpt_model", "padded_vocab_size"]

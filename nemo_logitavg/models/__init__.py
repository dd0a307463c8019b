"""Megatron-Core models: the Llama-family builder (and, later, the actor and HF conversion)."""

from nemo_logitavg.models.builder import LlamaConfig, build_gpt_model, padded_vocab_size

__all__ = ["LlamaConfig", "build_gpt_model", "padded_vocab_size"]

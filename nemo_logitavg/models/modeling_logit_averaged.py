"""pi_mix as a transformers model: AutoModelForCausalLM.from_pretrained(bundle, trust_remote_code=True).

A bundle holds `policy/` and `reference/` (plain Hugging Face directories, or `reference_path` in config.json)
and `ref_weight` a. The model's logits are the average m = (1 - a) * z_policy + a * z_reference, so
`generate` samples from pi_mix = softmax(m / T). This file is self-contained (it is copied into each bundle)
and needs only torch and transformers. Each stack keeps its own KV cache, carried as a pair.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class LogitAveragedConfig(PretrainedConfig):
    model_type = "logit_averaged"

    def __init__(self, ref_weight: float = 0.5, reference_path: str | None = None, vocab_size: int | None = None,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(**kwargs)
        if not 0.0 <= float(ref_weight) <= 1.0:
            raise ValueError(f"ref_weight must lie in [0, 1], got {ref_weight}")
        self.ref_weight = float(ref_weight)
        self.reference_path = reference_path
        self.vocab_size = vocab_size


class LogitAveragedForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LogitAveragedConfig
    base_model_prefix = "policy"

    def __init__(self, config: LogitAveragedConfig, policy: torch.nn.Module, reference: torch.nn.Module) -> None:
        super().__init__(config)
        self.policy = policy
        self.reference = reference
        self.generation_config.use_cache = False  # two stacks: recompute rather than share one cache object

    @classmethod
    def from_pretrained(cls, path, *args, config=None, **kwargs):  # type: ignore[override]
        path = os.fspath(path)
        for key in ("trust_remote_code", "code_revision", "_from_auto", "adapter_kwargs"):
            kwargs.pop(key, None)
        config = config if isinstance(config, LogitAveragedConfig) else LogitAveragedConfig.from_pretrained(path)
        reference_dir = config.reference_path or os.path.join(path, "reference")
        policy = AutoModelForCausalLM.from_pretrained(os.path.join(path, "policy"), **kwargs)
        reference = AutoModelForCausalLM.from_pretrained(reference_dir, **kwargs)
        if policy.config.vocab_size != reference.config.vocab_size:
            raise ValueError(
                f"{path}: policy and reference vocabularies differ "
                f"({policy.config.vocab_size} vs {reference.config.vocab_size})"
            )
        model = cls(config, policy, reference)
        model.eval()
        return model

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.policy.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
        a = self.config.ref_weight
        common = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": False}  # fmt: skip
        policy_logits = self.policy(**common).logits
        with torch.no_grad():
            reference_logits = self.reference(**common).logits
        logits = (1.0 - a) * policy_logits + a * reference_logits
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

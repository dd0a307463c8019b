"""vLLM plugin: makes a release bundle (architecture ``LogitAveragedForCausalLM``) servable by vLLM.

Registered in ``pyproject.toml`` under ``[project.entry-points."vllm.general_plugins"]``, so every vLLM process
(API server, engine core, workers) calls ``register`` once it has the package installed:

    python -m vllm.entrypoints.openai.api_server --model BUNDLE --tokenizer BUNDLE/policy

(``vllm serve`` is missing from the community CPU build; the module form works in both builds.)

``register`` does two things, neither importing vLLM's model code:

- ``transformers.AutoConfig`` learns ``model_type: logit_averaged`` as ``LogitAveragedVLLMConfig`` (below), so
  vLLM parses a bundle's ``config.json`` without ``trust_remote_code``;
- ``vllm.ModelRegistry`` maps ``LogitAveragedForCausalLM`` lazily to ``nemo_logitavg.rollout.vllm_model``.

It also holds the safetensors helper shared by the model and the engine (the bundle layout itself is in
``nemo_logitavg.models.bundle``). This module imports only transformers and that standard-library module (with
the light ``nemo_logitavg.models`` package, torch) at import time: the rest of the project may import it without
vLLM.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

from nemo_logitavg.models.bundle import BUNDLE_ARCHITECTURE, BUNDLE_MODEL_TYPE, bundle_dirs
from nemo_logitavg.ops.ref_weight import check_ref_weight

MODEL_CLASS = "nemo_logitavg.rollout.vllm_model:LogitAveragedForCausalLM"
WORKER_EXTENSION = "nemo_logitavg.rollout.vllm_model.PolicyWeightsExtension"

# Keys of the policy's config.json that describe the bundle itself rather than the text model.
_NOT_COPIED = {"architectures", "model_type", "auto_map", "_name_or_path", "transformers_version", "name_or_path"}


def _sub_config(value: Any) -> PretrainedConfig | None:
    if value is None or isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        return CONFIG_MAPPING[value["model_type"]].from_dict(dict(value))
    raise TypeError(f"expected a config or a dict, got {type(value).__name__}")


def safetensors_files(path: str) -> list[str]:
    """The safetensors files of a Hugging Face directory (sharded through its index, or single)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            return [os.path.join(path, f) for f in sorted(set(json.load(fh)["weight_map"].values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


class LogitAveragedVLLMConfig(PretrainedConfig):
    """A bundle's ``config.json`` as vLLM needs it: the policy's text-model fields (hidden size, heads, layers,
    context length, dtype, rope) copied to the top level, so that vLLM sizes the engine as for the policy,
    plus ``policy_config`` and ``reference_config`` (each stack is built from its own) and ``ref_weight``.

    The sub-configs are read from ``policy/`` and ``reference/`` (or ``reference_path``) next to the
    ``config.json`` when the config is loaded from a directory (``from_pretrained`` / ``AutoConfig``).
    """

    model_type = BUNDLE_MODEL_TYPE

    def __init__(
        self,
        ref_weight: float = 0.5,
        reference_path: str | None = None,
        policy_config: PretrainedConfig | dict | None = None,
        reference_config: PretrainedConfig | dict | None = None,
        **kwargs,
    ) -> None:
        self.policy_config = _sub_config(policy_config)
        self.reference_config = _sub_config(reference_config)
        if self.policy_config is not None:
            for key, value in self.policy_config.to_dict().items():
                if key not in _NOT_COPIED and key not in kwargs:
                    kwargs[key] = value
        super().__init__(**kwargs)
        self.ref_weight = check_ref_weight(ref_weight)
        self.reference_path = reference_path

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):  # type: ignore[override]
        root = kwargs.get("name_or_path") or config_dict.get("_name_or_path")
        if root and os.path.isdir(os.fspath(root)) and config_dict.get("policy_config") is None:
            config_dict = {**config_dict, **_load_sub_configs(os.fspath(root), config_dict)}
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):  # type: ignore[override]
        kwargs.setdefault("name_or_path", os.fspath(pretrained_model_name_or_path))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


def _load_sub_configs(root: str, config: dict) -> dict:
    policy_dir, reference_dir = bundle_dirs(root, config)
    out = {}
    for key, path in (("policy_config", policy_dir), ("reference_config", reference_dir)):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"bundle {root}: {path} is not a Hugging Face directory (no config.json)")
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            sub = json.load(fh)
        if "model_type" not in sub:
            raise ValueError(f"{path}/config.json has no model_type")
        out[key] = CONFIG_MAPPING[sub["model_type"]].from_dict(sub)
    policy_vocab = out["policy_config"].vocab_size
    reference_vocab = out["reference_config"].vocab_size
    if policy_vocab != reference_vocab:
        raise ValueError(
            f"bundle {root}: policy and reference vocabularies differ ({policy_vocab} vs {reference_vocab}): "
            "logits cannot be averaged"
        )
    return out


_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point; idempotent (vLLM calls it in every process)."""
    global _registered
    if _registered:
        return
    AutoConfig.register(BUNDLE_MODEL_TYPE, LogitAveragedVLLMConfig, exist_ok=True)
    # vLLM is optional: this module also serves transformers' AutoConfig (release bundles) without it
    from vllm import ModelRegistry

    if BUNDLE_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(BUNDLE_ARCHITECTURE, MODEL_CLASS)
    _registered = True

"""The averaged-model bundle (docs/design.md §7), the layout shared by the rollout (vLLM engine), evaluation and
release code, so it lives below all three:

    bundle/config.json   {"architectures": ["LogitAveragedForCausalLM"], "ref_weight": a, ...}
    bundle/policy/       a plain Hugging Face directory
    bundle/reference/    a plain Hugging Face directory (or its path in config.json under "reference_path")

``write_bundle`` also copies ``modeling_logit_averaged.py`` (beside this module) into the bundle, so transformers
loads it as pi_mix with ``trust_remote_code``. This module imports nothing but the standard library (the vLLM
plugin reads the layout from here in every vLLM process).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from nemo_logitavg.ops.ref_weight import check_ref_weight

BUNDLE_ARCHITECTURE = "LogitAveragedForCausalLM"
BUNDLE_MODEL_TYPE = "logit_averaged"
# pi_mix's transformers code, copied into every bundle (by path: it is not imported here, it needs transformers).
MODELING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modeling_logit_averaged.py")


@dataclass
class Bundle:
    """A bundle read from disk: its directory, its two Hugging Face directories and the reference weight."""

    path: str
    policy: str
    reference: str
    ref_weight: float
    config: dict


def bundle_dirs(root: str, config: dict) -> tuple[str, str]:
    """The policy and reference directories of the bundle at ``root`` whose ``config.json`` holds ``config``."""
    policy = os.path.join(root, "policy")
    reference = config.get("reference_path") or os.path.join(root, "reference")
    if not os.path.isabs(reference):
        reference = os.path.join(root, reference)
    return policy, reference


def write_bundle(
    policy_dir: str | os.PathLike, reference_dir: str | os.PathLike, ref_weight: float, out: str | os.PathLike,
    copy_reference: bool = True,
) -> str:  # fmt: skip
    """Write an averaged-model bundle: ``out/config.json``, ``out/policy/`` (a copy of ``policy_dir``) and
    ``out/reference/`` (a copy), or, with ``copy_reference=False``, the reference's absolute path in config.json
    under ``reference_path``. Returns ``out``."""
    ref_weight = check_ref_weight(ref_weight)
    policy_dir, reference_dir, out = os.fspath(policy_dir), os.fspath(reference_dir), os.fspath(out)
    for name, path in (("policy", policy_dir), ("reference", reference_dir)):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{name} {path} is not a Hugging Face directory (no config.json)")
    os.makedirs(out, exist_ok=True)
    shutil.copytree(policy_dir, os.path.join(out, "policy"), dirs_exist_ok=True)
    config = {"architectures": [BUNDLE_ARCHITECTURE], "ref_weight": ref_weight}
    if copy_reference:
        shutil.copytree(reference_dir, os.path.join(out, "reference"), dirs_exist_ok=True)
    else:
        config["reference_path"] = os.path.abspath(reference_dir)
    with open(os.path.join(out, "policy", "config.json"), encoding="utf-8") as fh:
        policy_config = json.load(fh)
    if "vocab_size" in policy_config:
        config["vocab_size"] = policy_config["vocab_size"]
    # transformers loads the bundle as pi_mix with trust_remote_code: the modeling file travels with it.
    shutil.copy(MODELING_FILE, os.path.join(out, "modeling_logit_averaged.py"))
    config["model_type"] = BUNDLE_MODEL_TYPE
    config["auto_map"] = {
        "AutoConfig": "modeling_logit_averaged.LogitAveragedConfig",
        "AutoModelForCausalLM": "modeling_logit_averaged.LogitAveragedForCausalLM",
    }
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    return out


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``config.json`` naming the bundle architecture."""
    config = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError:
            return False
    return isinstance(data, dict) and BUNDLE_ARCHITECTURE in (data.get("architectures") or [])


def read_bundle(path: str | os.PathLike) -> Bundle:
    """The bundle at ``path`` (ValueError naming what is missing or wrong)."""
    path = os.fspath(path)
    if not is_bundle(path):
        raise ValueError(f"{path} is not a bundle (config.json without architectures [{BUNDLE_ARCHITECTURE!r}])")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    if not isinstance(config.get("ref_weight"), (int, float)) or isinstance(config.get("ref_weight"), bool):
        raise ValueError(f"{path}/config.json: ref_weight must be a number")
    ref_weight = check_ref_weight(config["ref_weight"])
    policy, reference = bundle_dirs(path, config)
    for name, sub in (("policy", policy), ("reference", reference)):
        if not os.path.isfile(os.path.join(sub, "config.json")):
            raise ValueError(f"{path}: bundle {name} {sub} is not a Hugging Face directory")
    return Bundle(path=path, policy=policy, reference=reference, ref_weight=ref_weight, config=config)


__all__ = [
    "BUNDLE_ARCHITECTURE",
    "BUNDLE_MODEL_TYPE",
    "MODELING_FILE",
    "Bundle",
    "bundle_dirs",
    "is_bundle",
    "read_bundle",
    "write_bundle",
]

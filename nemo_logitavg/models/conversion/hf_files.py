"""Hugging Face directories: safetensors weights read lazily, and written (single file or sharded with an index)
with config.json and the source's tokenizer / generation files.

``export_hf`` writes weights held in memory (the offline converter's path); a live, sharded model leaves through
``streaming.export_model_hf``, which writes its files with the helpers here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemo_logitavg.models.builder import LlamaConfig
from nemo_logitavg.models.conversion.mapping import check_hf_state, hf_bucket_plan, hf_shapes
from nemo_logitavg.models.families import family_of

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".gguf")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # above this, the weights are split into several files and an index


class _SafetensorsState(Mapping):
    """Hugging Face weights of a directory, read lazily tensor by tensor (memory-mapped safetensors)."""

    def __init__(self, files: dict[str, str]) -> None:
        self._files = files  # name -> path

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def read_hf_state(hf_dir: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """The weights of a Hugging Face directory (``model.safetensors`` or a sharded index), loaded on access: each
    lookup returns the stored tensor (its saved shape and dtype, on the CPU).

    Raises:
        FileNotFoundError: no safetensors weights in the directory, or a shard the index names is absent.
    """
    hf_dir = os.fspath(hf_dir)
    index, single = os.path.join(hf_dir, SAFETENSORS_INDEX), os.path.join(hf_dir, SAFETENSORS_SINGLE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
        absent = sorted({path for path in files.values() if not os.path.isfile(path)})
        if absent:
            raise FileNotFoundError(f"{index} names weight files that do not exist: {', '.join(absent)}")
        return _SafetensorsState(files)
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return _SafetensorsState({name: single for name in f.keys()})
    others = (
        [name for name in sorted(os.listdir(hf_dir)) if name.endswith(WEIGHT_SUFFIXES)] if os.path.isdir(hf_dir) else []
    )
    found = f" (found only {', '.join(others)}; convert them to safetensors)" if others else ""
    raise FileNotFoundError(f"no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} in {hf_dir}{found}")


def hf_config_dict(cfg: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A ``config.json`` for ``cfg`` that transformers 4.x and 5.x read (the architecture of ``cfg``'s family)."""
    family = family_of(cfg)
    dtype_name = str(dtype).removeprefix("torch.")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_factor is not None:
        rope = {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
        }
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4 (5 reads rope_parameters)
        "rope_parameters": rope,
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"}
        if cfg.rope_scaling_factor is not None
        else None,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    config.update(family.export_config(cfg))
    return config


def copy_assets(source_dir: str | os.PathLike | None, out_dir: str) -> list[str]:
    """Copy tokenizer, generation and other non-weight files (not config.json) of ``source_dir``."""
    if source_dir is None or not os.path.isdir(source_dir):
        return []
    copied = []
    for name in sorted(os.listdir(source_dir)):
        path = os.path.join(source_dir, name)
        if name == "config.json" or name.startswith(".") or name.endswith(WEIGHT_SUFFIXES) or not os.path.isfile(path):
            continue
        shutil.copyfile(path, os.path.join(out_dir, name))
        copied.append(name)
    return copied


def export_config(cfg: LlamaConfig, dtype: torch.dtype, source_dir: str | os.PathLike | None) -> dict:
    """The exported ``config.json``: the source's (its dtype updated) when it has one, else one from ``cfg``.

    Raises:
        ValueError: the source config describes another model.
    """
    source_config = os.path.join(source_dir, "config.json") if source_dir is not None else None
    if source_config is None or not os.path.isfile(source_config):
        return hf_config_dict(cfg, dtype)
    with open(source_config, encoding="utf-8") as f:
        config = json.load(f)
    if LlamaConfig.from_hf(config) != cfg:
        raise ValueError(f"{source_config} describes another model than the weights' config {cfg}")
    dtype_name = str(dtype).removeprefix("torch.")
    config.update({key: dtype_name for key in ("dtype", "torch_dtype") if key in config} or {"dtype": dtype_name})
    return config


def weight_files(
    cfg: LlamaConfig, pp_size: int, dtype: torch.dtype, max_shard_bytes: int
) -> list[list[tuple[str, list[str]]]]:
    """Per pipeline stage, its safetensors files and the tensors each holds (files never span stages): one file in
    all is ``model.safetensors``, more are ``model-0000k-of-0000n.safetensors`` numbered over the stages."""
    plans = [hf_bucket_plan(cfg, pp, pp_size, max_shard_bytes, dtype) for pp in range(pp_size)]
    total = sum(len(plan) for plan in plans)
    files, k = [], 0
    for plan in plans:
        stage = []
        for bucket in plan:
            k += 1
            name = SAFETENSORS_SINGLE if total == 1 else f"model-{k:05d}-of-{total:05d}.safetensors"
            stage.append((name, [tensor for tensor, _ in bucket]))
        files.append(stage)
    return files


def save_weight_file(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    """One safetensors file of CPU tensors, flushed to disk (an export's directory is renamed into place only after
    every file is)."""
    save_file(dict(tensors), path, metadata={"format": "pt"})
    fsync(path)


def fsync(path: str) -> None:
    """Flush a file or a directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_metadata(
    out_dir: str,
    cfg: LlamaConfig,
    config: dict,
    files: Sequence[Sequence[tuple[str, list[str]]]],
    dtype: torch.dtype,
    source_dir: str | os.PathLike | None,
) -> None:
    """The index (when the weights span several files), config.json and the source's tokenizer / generation files."""
    weight_map = {tensor: file for stage in files for file, tensors in stage for tensor in tensors}
    if len(set(weight_map.values())) > 1:
        itemsize = torch.empty((), dtype=dtype).element_size()
        total = sum(itemsize * math.prod(shape) for shape in hf_shapes(cfg).values())
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    copy_assets(source_dir, out_dir)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def export_hf(
    hf_state: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    cfg: LlamaConfig,
    source_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads, from weights in memory
    (the offline converter's path; a live model exports with ``streaming.export_model_hf``).

    Args:
        hf_state: full Hugging Face weights (``mapping.mcore_to_hf_state_dict``), one dtype (written as is).
        out_dir: created if needed; safetensors files already there are replaced.
        cfg: the model's shape.
        source_dir: a Hugging Face directory whose ``config.json`` (dtype updated) and tokenizer / generation
            files are carried over; without one a config is written from ``cfg``.
        max_shard_bytes: above this, the weights are split into ``model-0000k-of-0000n.safetensors`` plus index.

    Raises:
        ValueError: the weights do not match ``cfg``, or the source config describes another model.
    """
    check_hf_state(hf_state, cfg)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    dtype = hf_state["model.embed_tokens.weight"].dtype
    config = export_config(cfg, dtype, source_dir)
    for name in os.listdir(out_dir):
        if name.endswith((".safetensors", ".safetensors.index.json")):
            os.remove(os.path.join(out_dir, name))
    files = weight_files(cfg, 1, dtype, max_shard_bytes)
    for file, names in files[0]:
        tensors = {name: hf_state[name].detach().cpu().contiguous() for name in names}
        save_weight_file(tensors, os.path.join(out_dir, file))
    write_metadata(out_dir, cfg, config, files, dtype, source_dir)

"""The converter's Megatron checkpoint: one plain ``torch.save`` state dict per model-parallel rank.

    CKPT/meta.json                          format, tensor/pipeline parallel sizes, padded vocabulary, LlamaConfig
    CKPT/mp_rank_{tp:02d}_{pp:03d}/model.pt this rank's weights (megatron-core names, local layer numbering)
    CKPT/hf/                                the source's config.json, tokenizer and generation files (for export)

Converting needs neither torch.distributed nor a model; ``load_mcore_checkpoint`` re-shards through the full
Hugging Face names when the model's TP/PP layout differs from the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping

import torch

from nemo_logitavg.models.builder import LlamaConfig, padded_vocab_size
from nemo_logitavg.models.conversion.hf_files import copy_assets, export_hf, read_hf_state
from nemo_logitavg.models.conversion.loading import (
    check_model_matches,
    load_mcore_state_dict,
    model_layers,
    parallel_ranks,
    unwrap,
)
from nemo_logitavg.models.conversion.mapping import (
    check_hf_state,
    check_parallel_layout,
    hf_to_mcore_state_dict,
    local_names,
    mcore_to_hf_state_dict,
    stage_layers,
)

CHECKPOINT_FORMAT = "nemo_logitavg-mcore-shards"
CHECKPOINT_VERSION = 1


def _shard_path(ckpt_dir: str, tp_rank: int, pp_rank: int) -> str:
    return os.path.join(ckpt_dir, f"mp_rank_{tp_rank:02d}_{pp_rank:03d}", "model.pt")


def save_mcore_shard(shard: Mapping[str, torch.Tensor], out_dir: str | os.PathLike, tp_rank: int, pp_rank: int) -> None:
    """Write one rank's state dict (``_extra_state`` dropped, local-spec names) into a converter checkpoint."""
    path = _shard_path(os.fspath(out_dir), tp_rank, pp_rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(local_names(shard), path)


def save_mcore_meta(
    out_dir: str | os.PathLike,
    cfg: LlamaConfig,
    tp_size: int,
    pp_size: int,
    padded_vocab: int,
    source_dir: str | os.PathLike | None = None,
) -> None:
    """Write the checkpoint's ``meta.json``, and the source's config.json and tokenizer files under ``hf/``."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if source_dir is not None:
        assets = os.path.join(out_dir, "hf")
        os.makedirs(assets, exist_ok=True)
        copy_assets(source_dir, assets)
        if os.path.isfile(os.path.join(source_dir, "config.json")):
            shutil.copyfile(os.path.join(source_dir, "config.json"), os.path.join(assets, "config.json"))
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "tensor_parallel_size": tp_size,
        "pipeline_parallel_size": pp_size,
        "padded_vocab_size": padded_vocab,
        "model": dataclasses.asdict(cfg),
    }
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def read_checkpoint_meta(ckpt_dir: str | os.PathLike) -> tuple[dict, LlamaConfig]:
    """The checkpoint's ``meta.json`` and model config. Raises FileNotFoundError / ValueError when not one."""
    path = os.path.join(os.fspath(ckpt_dir), "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no meta.json in {ckpt_dir}: not a checkpoint written by convert_hf_to_mcore")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} v{meta.get('version')} is not "
            f"{CHECKPOINT_FORMAT!r} v{CHECKPOINT_VERSION}"
        )
    return meta, LlamaConfig(**meta["model"])


def read_mcore_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[list[list[dict[str, torch.Tensor]]], LlamaConfig]:
    """All shards of a converter checkpoint as ``[pp_rank][tp_rank]``, and its config."""
    meta, cfg = read_checkpoint_meta(ckpt_dir)
    shards = []
    for pp in range(meta["pipeline_parallel_size"]):
        stage = []
        for tp in range(meta["tensor_parallel_size"]):
            path = _shard_path(os.fspath(ckpt_dir), tp, pp)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"checkpoint shard {path} is missing")
            stage.append(torch.load(path, map_location="cpu", weights_only=True))
        shards.append(stage)
    return shards, cfg


def load_mcore_checkpoint(model: torch.nn.Module, ckpt_dir: str | os.PathLike) -> LlamaConfig:
    """Load this rank's part of a converter checkpoint; re-shards when the model's TP/PP/vocab layout differs."""
    model = unwrap(model)
    meta, cfg = read_checkpoint_meta(ckpt_dir)
    check_model_matches(model, cfg, os.fspath(ckpt_dir))
    tp_rank, tp_size, pp_rank, pp_size = parallel_ranks()
    layers = model_layers(model)
    same_layout = (
        meta["tensor_parallel_size"] == tp_size
        and meta["pipeline_parallel_size"] == pp_size
        and meta["padded_vocab_size"] == model.vocab_size
        and list(layers) == list(stage_layers(cfg.num_hidden_layers, pp_rank, pp_size))
    )
    if same_layout:
        state = torch.load(_shard_path(os.fspath(ckpt_dir), tp_rank, pp_rank), map_location="cpu", weights_only=True)
    else:
        shards, _ = read_mcore_checkpoint(ckpt_dir)
        state = hf_to_mcore_state_dict(
            mcore_to_hf_state_dict(shards, cfg),
            cfg,
            tp_rank,
            tp_size,
            pp_rank,
            pp_size,
            padded_vocab=model.vocab_size,
            layers=layers,
        )
    load_mcore_state_dict(model, state)
    return cfg


def convert_hf_to_mcore(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
) -> LlamaConfig:
    """Hugging Face directory -> converter checkpoint for a TP x PP grid (one process, no torch.distributed)."""
    cfg = LlamaConfig.from_hf(hf_dir)
    check_parallel_layout(cfg, tensor_parallel_size, pipeline_parallel_size)
    hf_state = read_hf_state(hf_dir)
    check_hf_state(hf_state, cfg, os.fspath(hf_dir))
    padded = padded_vocab_size(cfg.vocab_size, tensor_parallel_size)
    for pp in range(pipeline_parallel_size):
        for tp in range(tensor_parallel_size):  # one shard in memory at a time
            shard = hf_to_mcore_state_dict(hf_state, cfg, tp, tensor_parallel_size, pp, pipeline_parallel_size, padded)
            save_mcore_shard(shard, out_dir, tp, pp)
    save_mcore_meta(out_dir, cfg, tensor_parallel_size, pipeline_parallel_size, padded, source_dir=hf_dir)
    return cfg


def convert_mcore_to_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike) -> LlamaConfig:
    """Converter checkpoint -> Hugging Face directory (with the source's config and tokenizer files)."""
    shards, cfg = read_mcore_checkpoint(ckpt_dir)
    export_hf(mcore_to_hf_state_dict(shards, cfg), out_dir, cfg, source_dir=os.path.join(os.fspath(ckpt_dir), "hf"))
    return cfg

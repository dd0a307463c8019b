"""Llama-family (Llama, Qwen2) weights between Hugging Face (transformers) and megatron-core ``GPTModel`` shards.

Name mapping, for global layer ``i`` (local index ``j`` on its pipeline stage), TP rank ``r`` of ``t``:

    model.embed_tokens.weight           -> embedding.word_embeddings.weight          rows padded with zeros to the
                                                                                      padded vocabulary, split in t
    model.layers.i.input_layernorm      -> decoder.layers.j.input_layernorm.weight    replicated
    model.layers.i.self_attn.{q,k,v}    -> decoder.layers.j.self_attention.linear_qkv.weight
    model.layers.i.self_attn.{q,k,v}_proj.bias -> ...linear_qkv.bias (Qwen2)         same layout as the weight rows
    model.layers.i.self_attn.o_proj     -> decoder.layers.j.self_attention.linear_proj.weight   split on columns
    model.layers.i.post_attention_layernorm -> decoder.layers.j.pre_mlp_layernorm.weight        replicated
    model.layers.i.mlp.{gate,up}_proj   -> decoder.layers.j.mlp.linear_fc1.weight     [gate_r; up_r] on each rank
    model.layers.i.mlp.down_proj        -> decoder.layers.j.mlp.linear_fc2.weight     split on columns
    model.norm.weight                   -> decoder.final_layernorm.weight             last stage
    lm_head.weight                      -> output_layer.weight                        padded, split in t; absent
                                                                                      when tied, except on the
                                                                                      last stage at PP > 1

``linear_qkv`` is megatron's per-query-group layout: for each of the ``g = num_key_value_heads`` groups, its
``num_attention_heads / g`` query heads, then its key head, then its value head (rows of ``head_dim`` each).
TP ranks hold ``g / t`` whole groups. HF's Llama q/k projections are already in the rotate-half rotary layout,
which is megatron's default (``rotary_interleaved=False``), so no row permutation is needed. Qwen2's q/k/v
biases follow their weight rows into ``linear_qkv.bias``. With Transformer
Engine's layer spec (GPUs), the two layer norms are fused into ``linear_qkv.layer_norm_weight`` and
``linear_fc1.layer_norm_weight``; the loader and the exporters translate those names.

The converter's Megatron checkpoint is one plain ``torch.save`` state dict per model-parallel rank:

    CKPT/meta.json                          format, tensor/pipeline parallel sizes, padded vocabulary, LlamaConfig
    CKPT/mp_rank_{tp:02d}_{pp:03d}/model.pt this rank's weights (megatron-core names, local layer numbering)
    CKPT/hf/                                the source's config.json, tokenizer and generation files (for export)

Converting needs neither torch.distributed nor a model; ``load_mcore_checkpoint`` re-shards through the full
Hugging Face names when the model's TP/PP layout differs from the checkpoint's.

A live model leaves as a stream: ``iter_hf_buckets`` yields each pipeline stage's tensors in Hugging Face names,
full size, in the buckets of ``hf_bucket_plan`` (a pure function, so a receiver knows the shapes in advance),
gathering TP shards tensor by tensor over the TP group; ``export_model_hf`` writes a directory from it, every
stage its own files. Both ways out of megatron (``mcore_to_hf_state_dict`` offline, the stream live) read the
per-tensor sources of ``_stage_sources``: one mapping.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from nemo_logitavg.models.builder import SUPPORTED_ARCHITECTURES, LlamaConfig, padded_vocab_size

CHECKPOINT_FORMAT = "nemo_logitavg-mcore-shards"
CHECKPOINT_VERSION = 1
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".gguf")
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older exports carry; recomputed on load
_EXTRA_STATE = "_extra_state"
# Transformer Engine's spec fuses the pre-attention / pre-MLP norms into the following linear layer.
_TE_NAMES = (
    (".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight"),
    (".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight"),
)


# ----------------------------------------------------------------------------------------------- layout


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """Global layer indices on pipeline stage ``pp_rank``: megatron's even split."""
    if num_layers % pp_size:
        raise ValueError(f"pipeline_parallel_size={pp_size} does not divide num_hidden_layers={num_layers}")
    per_stage = num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def check_parallel_layout(cfg: LlamaConfig, tp_size: int, pp_size: int = 1) -> None:
    """Raise ValueError when the TP/PP sizes cannot shard ``cfg``."""
    if tp_size < 1 or pp_size < 1:
        raise ValueError(f"parallel sizes must be >= 1, got tensor={tp_size}, pipeline={pp_size}")
    for what, count in (
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
        ("intermediate_size", cfg.intermediate_size),
    ):
        if count % tp_size:
            raise ValueError(f"tensor_parallel_size={tp_size} does not divide {what}={count}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(
            f"num_key_value_heads={cfg.num_key_value_heads} does not divide "
            f"num_attention_heads={cfg.num_attention_heads}"
        )
    stage_layers(cfg.num_hidden_layers, 0, pp_size)


def _head_dim(cfg: LlamaConfig) -> int:
    return cfg.hidden_size // cfg.num_attention_heads


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face weight of ``cfg`` with its shape."""
    h, d, f = cfg.hidden_size, _head_dim(cfg), cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (cfg.num_attention_heads * d, h),
                p + "self_attn.k_proj.weight": (cfg.num_key_value_heads * d, h),
                p + "self_attn.v_proj.weight": (cfg.num_key_value_heads * d, h),
                p + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
                **(
                    {
                        p + "self_attn.q_proj.bias": (cfg.num_attention_heads * d,),
                        p + "self_attn.k_proj.bias": (cfg.num_key_value_heads * d,),
                        p + "self_attn.v_proj.bias": (cfg.num_key_value_heads * d,),
                    }
                    if cfg.qkv_bias
                    else {}
                ),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def stage_hf_names(cfg: LlamaConfig, pp_rank: int, pp_size: int) -> list[str]:
    """The Hugging Face tensor names pipeline stage pp_rank owns, in a fixed order: model.embed_tokens.weight on
    stage 0; its layers' tensors (global layer numbers, stage_layers()); model.norm.weight and lm_head.weight
    (untied only) on the last stage. Tied embeddings appear once (stage 0)."""
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} is outside pipeline_parallel_size={pp_size}")
    layers = stage_layers(cfg.num_hidden_layers, pp_rank, pp_size)
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    first, last = pp_rank == 0, pp_rank == pp_size - 1

    def owned(name: str) -> bool:
        if name == "model.embed_tokens.weight":
            return first
        if name in ("model.norm.weight", "lm_head.weight"):
            return last
        return name.startswith(prefixes)

    return [name for name in hf_shapes(cfg) if owned(name)]


def hf_bucket_plan(
    cfg: LlamaConfig, pp_rank: int, pp_size: int, bucket_bytes: int, dtype: torch.dtype
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """stage_hf_names grouped, in order, into buckets of at most bucket_bytes (a tensor larger than the bucket is a
    bucket of its own); each entry (hf_name, full HF shape from hf_shapes(cfg)). Pure function of its arguments:
    the receiving side computes the same plan."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    shapes, itemsize = hf_shapes(cfg), torch.empty((), dtype=dtype).element_size()
    buckets: list[list[tuple[str, tuple[int, ...]]]] = []
    size = 0
    for name in stage_hf_names(cfg, pp_rank, pp_size):
        nbytes = itemsize * math.prod(shapes[name])
        if not buckets or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append((name, shapes[name]))
        size += nbytes
    return buckets


def _listing(keys: Sequence[str] | set[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_hf_state(hf_state: Mapping[str, torch.Tensor], cfg: LlamaConfig, source: str = "the HF state") -> None:
    """Raise ValueError naming missing and unexpected Hugging Face keys (before any tensor is read)."""
    expected = set(hf_shapes(cfg))
    present = set(hf_state.keys())
    missing = expected - present
    unexpected = {
        k
        for k in present - expected
        if not k.endswith(_IGNORED_HF_SUFFIXES) and not (k == "lm_head.weight" and cfg.tie_word_embeddings)
    }
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if problems:
        raise ValueError(f"{source} does not match the Llama config: " + "; ".join(problems))


# ------------------------------------------------------------------------------------ HF -> megatron


def hf_to_mcore_state_dict(
    hf_state: Mapping[str, torch.Tensor],
    cfg: LlamaConfig,
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
    padded_vocab: int | None = None,
    layers: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """This rank's shard of the ``GPTModel`` state dict (megatron-core names, local layer numbers).

    Args:
        hf_state: Hugging Face names to tensors (a dict, or the lazy mapping of ``read_hf_state``).
        cfg: the model's shape; ``LlamaConfig.from_hf`` of the same directory.
        tp_rank, tp_size, pp_rank, pp_size: this rank's place in the model-parallel grid.
        padded_vocab: rows of the full embedding after padding; by default the builder's padding
            (``padded_vocab_size(cfg.vocab_size, tp_size)``).
        layers: global indices of this stage's layers; by default megatron's even split.

    The result holds fresh tensors (no views of ``hf_state``) and no ``_extra_state`` entries.

    Raises:
        ValueError: missing / unexpected / misshapen HF weights (named), or a TP/PP layout that cannot shard cfg.
    """
    check_parallel_layout(cfg, tp_size, pp_size)
    if not (0 <= tp_rank < tp_size and 0 <= pp_rank < pp_size):
        raise ValueError(f"rank (tp={tp_rank}, pp={pp_rank}) is outside tp_size={tp_size}, pp_size={pp_size}")
    check_hf_state(hf_state, cfg)
    shapes = hf_shapes(cfg)
    padded_vocab = padded_vocab or padded_vocab_size(cfg.vocab_size, tp_size)
    if padded_vocab < cfg.vocab_size or padded_vocab % tp_size:
        raise ValueError(f"padded vocabulary {padded_vocab} must be >= {cfg.vocab_size} and divisible by {tp_size}")
    layers = stage_layers(cfg.num_hidden_layers, pp_rank, pp_size) if layers is None else layers
    if any(not 0 <= i < cfg.num_hidden_layers for i in layers):
        raise ValueError(f"layers {list(layers)} are outside the model's {cfg.num_hidden_layers} layers")
    first, last = pp_rank == 0, pp_rank == pp_size - 1

    def get(name: str) -> torch.Tensor:
        tensor = hf_state[name]
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(f"HF weight {name} has shape {tuple(tensor.shape)}, expected {shapes[name]}")
        return tensor

    def rows(tensor: torch.Tensor) -> torch.Tensor:  # ColumnParallelLinear: split the output dimension
        return tensor.chunk(tp_size, dim=0)[tp_rank]

    def cols(tensor: torch.Tensor) -> torch.Tensor:  # RowParallelLinear: split the input dimension
        return tensor.chunk(tp_size, dim=1)[tp_rank]

    def vocab(tensor: torch.Tensor) -> torch.Tensor:
        pad = tensor.new_zeros(padded_vocab - tensor.shape[0], tensor.shape[1])
        return rows(torch.cat([tensor, pad]))

    groups, d, h = cfg.num_key_value_heads, _head_dim(cfg), cfg.hidden_size
    out: dict[str, torch.Tensor] = {}
    if first:
        out["embedding.word_embeddings.weight"] = vocab(get("model.embed_tokens.weight"))
    for local, i in enumerate(layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{local}."
        q = get(src + "self_attn.q_proj.weight").reshape(groups, -1, h)
        k = get(src + "self_attn.k_proj.weight").reshape(groups, d, h)
        v = get(src + "self_attn.v_proj.weight").reshape(groups, d, h)
        out[dst + "input_layernorm.weight"] = get(src + "input_layernorm.weight")
        out[dst + "self_attention.linear_qkv.weight"] = rows(torch.cat([q, k, v], dim=1)).reshape(-1, h)
        if cfg.qkv_bias:
            q_bias = get(src + "self_attn.q_proj.bias").reshape(groups, -1)
            k_bias = get(src + "self_attn.k_proj.bias").reshape(groups, d)
            v_bias = get(src + "self_attn.v_proj.bias").reshape(groups, d)
            out[dst + "self_attention.linear_qkv.bias"] = rows(torch.cat([q_bias, k_bias, v_bias], dim=1)).reshape(-1)
        out[dst + "self_attention.linear_proj.weight"] = cols(get(src + "self_attn.o_proj.weight"))
        out[dst + "pre_mlp_layernorm.weight"] = get(src + "post_attention_layernorm.weight")
        gate, up = get(src + "mlp.gate_proj.weight"), get(src + "mlp.up_proj.weight")
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([rows(gate), rows(up)])
        out[dst + "mlp.linear_fc2.weight"] = cols(get(src + "mlp.down_proj.weight"))
    if last:
        out["decoder.final_layernorm.weight"] = get("model.norm.weight")
        if not cfg.tie_word_embeddings:
            out["output_layer.weight"] = vocab(get("lm_head.weight"))
        elif pp_size > 1:  # the last stage keeps its own copy of the tied embedding
            out["output_layer.weight"] = vocab(get("model.embed_tokens.weight"))
    return {name: tensor.clone() for name, tensor in out.items()}


# ------------------------------------------------------------------------------------ megatron -> HF


def _local_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron state with Transformer Engine's fused norm names mapped to the local spec's, extra state dropped."""
    out = {}
    for name, value in state.items():
        if name.endswith(_EXTRA_STATE):
            continue
        for local, te in _TE_NAMES:
            if name.endswith(te):
                name = name[: -len(te)] + local
        out[name] = value
    return out


def _layer_count(state: Mapping[str, torch.Tensor]) -> int:
    numbers = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.layers\.(\d+)\.", k))}
    if numbers != set(range(len(numbers))):
        raise ValueError(f"layer numbers on a stage are not 0..n-1: {sorted(numbers)}")
    return len(numbers)


@dataclasses.dataclass(frozen=True)
class _HFSource:
    """Where one Hugging Face tensor lives on its pipeline stage: the one mapping both directions of export use."""

    mcore: str  # megatron-core name on the stage (local layer number, local-spec norm names)
    piece: Callable[[torch.Tensor], torch.Tensor] | None  # this TP rank's part, cut from its shard (None: all of it)
    dim: int | None  # TP ranks' parts are concatenated on this dimension; None: replicated (TP rank 0's copy)
    rows: int | None = None  # keep the first rows only (vocabulary padding removed)


def _stage_sources(
    cfg: LlamaConfig, layers: Sequence[int], first: bool, last: bool, pp_size: int
) -> tuple[dict[str, _HFSource], list[str]]:
    """The Hugging Face tensors of one pipeline stage (in ``hf_shapes`` order) and where each comes from, plus the
    megatron names the stage holds that export nothing (the last stage's copy of a tied embedding).

    ``layers`` are the stage's global layer numbers; local layer ``j`` is ``layers[j]``.
    """
    groups, d, h, v = cfg.num_key_value_heads, _head_dim(cfg), cfg.hidden_size, cfg.vocab_size
    q_rows = cfg.num_attention_heads // groups * d
    per_group = q_rows + 2 * d
    # linear_qkv holds, per query group, its query heads, key head and value head (rows of head_dim each).
    spans = {"q": (0, q_rows), "k": (q_rows, q_rows + d), "v": (q_rows + d, per_group)}

    def qkv_weight(which: str) -> Callable[[torch.Tensor], torch.Tensor]:
        lo, hi = spans[which]
        return lambda t: t.reshape(-1, per_group, h)[:, lo:hi].reshape(-1, h)

    def qkv_bias(which: str) -> Callable[[torch.Tensor], torch.Tensor]:
        lo, hi = spans[which]
        return lambda t: t.reshape(-1, per_group)[:, lo:hi].reshape(-1)

    def fc1(half: int) -> Callable[[torch.Tensor], torch.Tensor]:  # [gate_r; up_r] on each rank
        return lambda t: t.chunk(2)[half]

    sources: dict[str, _HFSource] = {}
    if first:
        sources["model.embed_tokens.weight"] = _HFSource("embedding.word_embeddings.weight", None, 0, v)
    for local, i in enumerate(layers):
        src, dst = f"decoder.layers.{local}.", f"model.layers.{i}."
        qkv = src + "self_attention.linear_qkv."
        sources[dst + "input_layernorm.weight"] = _HFSource(src + "input_layernorm.weight", None, None)
        for which in "qkv":
            sources[dst + f"self_attn.{which}_proj.weight"] = _HFSource(qkv + "weight", qkv_weight(which), 0)
        sources[dst + "self_attn.o_proj.weight"] = _HFSource(src + "self_attention.linear_proj.weight", None, 1)
        if cfg.qkv_bias:
            for which in "qkv":
                sources[dst + f"self_attn.{which}_proj.bias"] = _HFSource(qkv + "bias", qkv_bias(which), 0)
        sources[dst + "post_attention_layernorm.weight"] = _HFSource(src + "pre_mlp_layernorm.weight", None, None)
        sources[dst + "mlp.gate_proj.weight"] = _HFSource(src + "mlp.linear_fc1.weight", fc1(0), 0)
        sources[dst + "mlp.up_proj.weight"] = _HFSource(src + "mlp.linear_fc1.weight", fc1(1), 0)
        sources[dst + "mlp.down_proj.weight"] = _HFSource(src + "mlp.linear_fc2.weight", None, 1)
    silent = []
    if last:
        sources["model.norm.weight"] = _HFSource("decoder.final_layernorm.weight", None, None)
        if not cfg.tie_word_embeddings:
            sources["lm_head.weight"] = _HFSource("output_layer.weight", None, 0, v)
        elif pp_size > 1:
            silent.append("output_layer.weight")  # the last stage's copy of the tied embedding
    return sources, silent


def mcore_to_hf_state_dict(
    shards: Sequence[Sequence[Mapping[str, torch.Tensor]]], cfg: LlamaConfig
) -> dict[str, torch.Tensor]:
    """Merge every model-parallel rank's ``GPTModel`` state dict into Hugging Face names (vocab padding removed).

    Args:
        shards: ``shards[pp_rank][tp_rank]`` is that rank's ``model.state_dict()`` (``_extra_state`` entries and
            Transformer Engine's fused norm names are accepted).
        cfg: the model's shape.

    Raises:
        ValueError: a shard misses keys or has keys the mapping does not know (named), or the grid is ragged.
    """
    pp_size = len(shards)
    tp_size = len(shards[0]) if pp_size else 0
    if pp_size == 0 or tp_size == 0 or any(len(stage) != tp_size for stage in shards):
        raise ValueError("shards must be a non-empty [pp_rank][tp_rank] grid with the same TP size on every stage")
    check_parallel_layout(cfg, tp_size)
    grid = [[_local_names(s) for s in stage] for stage in shards]
    used: list[set[str]] = [set() for _ in range(pp_size)]

    def take(pp: int, name: str) -> list[torch.Tensor]:
        missing = [tp for tp in range(tp_size) if name not in grid[pp][tp]]
        if missing:
            raise ValueError(f"megatron shard (pp={pp}, tp={missing}) has no key {name}")
        used[pp].add(name)
        return [grid[pp][tp][name].detach().cpu() for tp in range(tp_size)]

    out: dict[str, torch.Tensor] = {}
    offset = 0
    for pp in range(pp_size):
        count = _layer_count(grid[pp][0])
        sources, silent = _stage_sources(cfg, range(offset, offset + count), pp == 0, pp == pp_size - 1, pp_size)
        for name, source in sources.items():
            parts = [source.piece(t) if source.piece else t for t in take(pp, source.mcore)]
            full = parts[0] if source.dim is None else torch.cat(parts, source.dim)
            out[name] = (full[: source.rows] if source.rows is not None else full).clone()
        for name in silent:
            take(pp, name)
        offset += count
    if offset != cfg.num_hidden_layers:
        raise ValueError(f"the shards hold {offset} layers, the config has {cfg.num_hidden_layers}")
    unexpected = {f"(pp={pp}) {k}" for pp in range(pp_size) for s in grid[pp] for k in s if k not in used[pp]}
    if unexpected:
        raise ValueError(
            f"megatron shards have keys the {cfg.model_type} mapping does not know: {_listing(unexpected)}"
        )
    return {name: out[name] for name in hf_shapes(cfg)}


# ----------------------------------------------------------------------------------- Hugging Face files


class _SafetensorsState(Mapping):
    """Hugging Face weights of a directory, read lazily tensor by tensor (memory-mapped safetensors)."""

    def __init__(self, files: dict[str, str]) -> None:
        self._files = files  # name -> path

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def read_hf_state(hf_dir: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """The weights of a Hugging Face directory (``model.safetensors`` or a sharded index), loaded on access.

    Raises:
        FileNotFoundError: no safetensors weights in the directory, or a shard the index names is absent.
    """
    from safetensors import safe_open

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
        [name for name in sorted(os.listdir(hf_dir)) if name.endswith(_WEIGHT_SUFFIXES)]
        if os.path.isdir(hf_dir)
        else []
    )
    found = f" (found only {', '.join(others)}; convert them to safetensors)" if others else ""
    raise FileNotFoundError(f"no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} in {hf_dir}{found}")


def hf_config_dict(cfg: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A ``config.json`` for ``cfg`` that transformers 4.x and 5.x read (``Qwen2ForCausalLM`` when ``qkv_bias``)."""
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
        "architectures": [SUPPORTED_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": _head_dim(cfg),
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
    if cfg.model_type == "qwen2":
        config.update(
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=cfg.num_hidden_layers,
            layer_types=["full_attention"] * cfg.num_hidden_layers,
        )
    else:
        config.update(attention_bias=False, mlp_bias=False)
    return config


def _copy_assets(source_dir: str | os.PathLike | None, out_dir: str) -> list[str]:
    """Copy tokenizer, generation and other non-weight files (not config.json) of ``source_dir``."""
    if source_dir is None or not os.path.isdir(source_dir):
        return []
    copied = []
    for name in sorted(os.listdir(source_dir)):
        path = os.path.join(source_dir, name)
        if name == "config.json" or name.startswith(".") or name.endswith(_WEIGHT_SUFFIXES) or not os.path.isfile(path):
            continue
        shutil.copyfile(path, os.path.join(out_dir, name))
        copied.append(name)
    return copied


def _export_config(cfg: LlamaConfig, dtype: torch.dtype, source_dir: str | os.PathLike | None) -> dict:
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


def _weight_files(
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


def _save_weight_file(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    """One safetensors file, flushed to disk (the directory is renamed into place only after every file is)."""
    from safetensors.torch import save_file

    save_file(dict(tensors), path, metadata={"format": "pt"})
    _fsync(path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_metadata(
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
    _copy_assets(source_dir, out_dir)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def export_hf(
    hf_state: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    cfg: LlamaConfig,
    source_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads, from weights in memory
    (the offline converter's path; a live model exports with ``export_model_hf``).

    Args:
        hf_state: full Hugging Face weights (``mcore_to_hf_state_dict``).
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
    config = _export_config(cfg, dtype, source_dir)
    for name in os.listdir(out_dir):
        if name.endswith((".safetensors", ".safetensors.index.json")):
            os.remove(os.path.join(out_dir, name))
    files = _weight_files(cfg, 1, dtype, max_shard_bytes)
    for file, names in files[0]:
        tensors = {name: hf_state[name].detach().cpu().contiguous() for name in names}
        _save_weight_file(tensors, os.path.join(out_dir, file))
    _write_metadata(out_dir, cfg, config, files, dtype, source_dir)


# --------------------------------------------------------------------------------- live megatron models


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # DDP / Float16Module wrappers
        model = model.module
    return model


def _model_layers(model: torch.nn.Module) -> list[int]:
    decoder = getattr(model, "decoder", None)
    return [layer.layer_number - 1 for layer in decoder.layers] if decoder is not None else []


def _parallel_ranks() -> tuple[int, int, int, int]:
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_rank(),
        ps.get_pipeline_model_parallel_world_size(),
    )


def _check_model_matches(model: torch.nn.Module, cfg: LlamaConfig, source: str) -> None:
    config = model.config
    pairs = {
        "hidden_size": (config.hidden_size, cfg.hidden_size),
        "ffn_hidden_size / intermediate_size": (config.ffn_hidden_size, cfg.intermediate_size),
        "num_layers / num_hidden_layers": (config.num_layers, cfg.num_hidden_layers),
        "num_attention_heads": (config.num_attention_heads, cfg.num_attention_heads),
        "num_query_groups / num_key_value_heads": (
            config.num_query_groups or config.num_attention_heads,
            cfg.num_key_value_heads,
        ),
        "layernorm_epsilon / rms_norm_eps": (config.layernorm_epsilon, cfg.rms_norm_eps),
        "add_qkv_bias / qkv_bias": (bool(config.add_qkv_bias), cfg.qkv_bias),
        "rope_scaling / rope_scaling_factor set": (
            bool(getattr(model, "rotary_scaling", False)),
            cfg.rope_scaling_factor is not None,
        ),
        "share_embeddings_and_output_weights / tie_word_embeddings": (
            model.share_embeddings_and_output_weights,
            cfg.tie_word_embeddings,
        ),
    }
    if getattr(model, "rotary_base", None) is not None:
        pairs["rotary_base / rope_theta"] = (float(model.rotary_base), cfg.rope_theta)
    wrong = [f"{name}: model {ours} vs {theirs}" for name, (ours, theirs) in pairs.items() if ours != theirs]
    inv_freq = getattr(getattr(model, "rotary_pos_emb", None), "inv_freq", None)
    if inv_freq is not None and not wrong:
        expected = _rotary_inv_freq(cfg)
        if inv_freq.shape != expected.shape or not torch.allclose(inv_freq.detach().cpu().float(), expected):
            wrong.append("rotary frequencies (rope_theta / rope_scaling_factor) differ")
    if model.vocab_size < cfg.vocab_size:
        wrong.append(f"vocab_size: model {model.vocab_size} < {cfg.vocab_size}")
    if wrong:
        raise ValueError(f"the model was not built for {source}: " + "; ".join(wrong))


def _rotary_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """megatron-core's rotary inverse frequencies for ``cfg`` (float32, CPU), llama3 scaling included."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rotary = RotaryEmbedding(
        kv_channels=_head_dim(cfg),
        rotary_percent=1.0,
        rotary_base=int(cfg.rope_theta),
        rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor if cfg.rope_scaling_factor is not None else 8.0,
        use_cpu_initialization=True,
    )
    return rotary.inv_freq


def load_mcore_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a shard in local-spec names into ``model`` strictly (any spec; ``_extra_state`` kept from the model).

    Raises:
        ValueError: naming the keys the model has and the shard lacks, the keys it has that the model lacks, and
            any shape mismatch.
    """
    model = _unwrap(model)
    own = model.state_dict()
    fused = {local: te for local, te in _TE_NAMES if any(k.endswith(te) for k in own)}
    renamed = {}
    for name, value in state.items():
        for local, te in fused.items():
            if name.endswith(local):
                name = name[: -len(local)] + te
        renamed[name] = value
    missing = {k for k in own if k not in renamed and not k.endswith(_EXTRA_STATE)}
    unexpected = {k for k in renamed if k not in own}
    shapes = {
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in renamed.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    }
    problems = [
        f"{what}: {_listing(keys)}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if keys
    ]
    if problems:
        raise ValueError("state dict does not fit the megatron model: " + "; ".join(problems))
    extra = {k: v for k, v in own.items() if k.endswith(_EXTRA_STATE) and k not in renamed}
    model.load_state_dict({**renamed, **extra}, strict=True)


def load_hf_into_mcore(model: torch.nn.Module, hf_dir: str | os.PathLike) -> LlamaConfig:
    """Load this rank's shard of a Hugging Face Llama directory into a ``GPTModel`` built for it.

    Call under ``init_parallel`` (the TP/PP ranks come from megatron's parallel state) on a model from
    ``build_gpt_model(LlamaConfig.from_hf(hf_dir), ...)``. Returns that config.

    Raises:
        ValueError: unsupported architecture, a model built for another config, or keys that do not match
            (named). FileNotFoundError: no config.json or safetensors weights.
    """
    model = _unwrap(model)
    cfg = LlamaConfig.from_hf(hf_dir)
    _check_model_matches(model, cfg, os.fspath(hf_dir))
    tp_rank, tp_size, pp_rank, pp_size = _parallel_ranks()
    hf_state = read_hf_state(hf_dir)
    check_hf_state(hf_state, cfg, os.fspath(hf_dir))
    state = hf_to_mcore_state_dict(
        hf_state, cfg, tp_rank, tp_size, pp_rank, pp_size, padded_vocab=model.vocab_size, layers=_model_layers(model)
    )
    load_mcore_state_dict(model, state)
    return cfg


_COLUMN_BLOCKS = 4  # column-split tensors move in this many row blocks: a quarter of a shard in flight, not all
_COLUMN_BLOCK_MAX_BYTES = 64 * 2**20


def _fill_full(
    out: torch.Tensor | None, local: torch.Tensor, source: _HFSource, group, tp_size: int, shape: tuple[int, ...],
    dst: int | None = None,
) -> None:
    """Write the full Hugging Face tensor ``source`` describes (``shape``) into ``out`` (its place in the bucket),
    from this rank's shard ``local``: a collective over the TP ``group``.

    ``dst=None``: every rank ends with the same values; each TP rank broadcasts its rows straight into their place
    (gloo's all-gather would stage the whole tensor in a second buffer). ``dst`` a TP rank: only that rank
    assembles the tensor (the others pass ``out=None``), the others send it their parts point to point, half the
    traffic of the broadcasts at TP=2 and 1/TP of it at larger TP. Column-split tensors pass through one buffer of
    a block of rows on the receiving ranks.
    """
    import torch.distributed as dist

    piece = (source.piece(local) if source.piece is not None else local).detach()
    me = dist.get_rank(group)
    mine = dst is None or me == dst  # this rank assembles the tensor

    def move(r: int, part: torch.Tensor) -> None:  # rank r's part, from r to the assembling rank(s), in place
        if dst is None:
            dist.broadcast(part, src=dist.get_global_rank(group, r), group=group)
        elif r != dst and me == r:
            dist.send(part.contiguous(), dst=dist.get_global_rank(group, dst), group=group)
        elif r != dst and me == dst:
            dist.recv(part, src=dist.get_global_rank(group, r), group=group)

    if tp_size == 1 or source.dim is None:
        if mine:
            out.copy_(piece[: shape[0]])  # TP=1: the vocabulary padding rows are dropped by the slice
        if tp_size > 1:  # replicated: TP rank 0's copy, as the offline mapping takes, on every assembling rank
            move(0, out if mine else piece[: shape[0]])
        return
    if source.dim == 0:
        per_rank = piece.shape[0]
        for r in range(tp_size):
            start = r * per_rank
            count = min(per_rank, shape[0] - start)  # the vocabulary's padding rows are not sent
            if count <= 0:
                break
            if r == me and mine:
                out[start : start + count].copy_(piece[:count])
            move(r, out[start : start + count] if mine else piece[:count])
        return
    # Split on columns: rank r's columns, row block by row block; the assembling ranks receive through one
    # block-sized buffer, a sending rank's rows are contiguous already.
    rows, cols = piece.shape
    row_bytes = cols * piece.element_size()
    block = max(1, min(-(-rows // _COLUMN_BLOCKS), _COLUMN_BLOCK_MAX_BYTES // row_bytes))
    staging = piece.new_empty((block, cols)) if mine else None
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        for r in range(tp_size):
            if not mine:
                if r == me:
                    move(r, piece[start:stop])
                continue
            part = staging[: stop - start]
            if r == me:
                part.copy_(piece[start:stop])
            move(r, part)
            out[start:stop, r * cols : (r + 1) * cols].copy_(part)


def _check_piece(name: str, local: torch.Tensor, source: _HFSource, shape: tuple[int, ...], tp_size: int) -> None:
    """Raise ValueError when this rank's part cannot make ``shape`` (a model built for another config)."""
    piece = list((source.piece(local) if source.piece is not None else local).shape)
    parts = 1 if source.dim is None else tp_size
    dim = 0 if source.dim is None else source.dim
    whole = [n * parts if d == dim else n for d, n in enumerate(piece)]
    padded = source.rows is not None  # the vocabulary: padding rows beyond the true size
    fits = len(whole) == len(shape) and all(
        (w >= n if padded and d == 0 else w == n) for d, (w, n) in enumerate(zip(whole, shape, strict=True))
    )
    if not fits:
        raise ValueError(f"{name}: this rank's part {tuple(piece)} cannot make the config's shape {shape}")


def iter_hf_buckets(
    model: torch.nn.Module, cfg: LlamaConfig, bucket_bytes: int, dst: int | None = None
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """This pipeline stage's policy weights as Hugging Face-named FULL tensors, bucket by bucket, exactly following
    hf_bucket_plan(cfg, pp_rank, pp_size, bucket_bytes, param dtype). A collective over this rank's tensor-parallel
    group only (every TP rank of the stage calls it in lockstep, any DP replica may); TP shards are all-gathered per
    tensor (vocab padding removed, q/k/v and gate/up split as the mapping does), never the whole model. Every TP
    rank yields identical full tensors, on the model's device (CUDA tensors over NCCL on GPUs, CPU over gloo).
    With ``dst`` (a TP rank: the push's sender, the export's writer) only that rank assembles and yields the
    tensors; the others send it their shards and yield an empty list per bucket, in lockstep. Peak extra memory:
    one bucket plus one tensor in flight (on the other ranks with ``dst``: one contiguous part in flight).

    The tensors are fresh (no views of the parameters): consecutive views of one buffer per bucket, in plan
    order. A consumer that drops each bucket before asking for the next keeps the peak at one bucket. Checked
    before any collective (so every TP rank raises together): the stage's layers are megatron's even split, its
    state dict has exactly the mapping's keys and shapes that make the config's, one dtype.

    Raises:
        ValueError: naming the mismatched layers, keys or dtypes.
    """
    from megatron.core import parallel_state as ps

    model = _unwrap(model)
    tp_rank, tp_size, pp_rank, pp_size = _parallel_ranks()
    check_parallel_layout(cfg, tp_size, pp_size)
    layers = stage_layers(cfg.num_hidden_layers, pp_rank, pp_size)
    if _model_layers(model) != list(layers):
        raise ValueError(
            f"pipeline stage {pp_rank} holds layers {_model_layers(model)}, the even split of "
            f"{cfg.num_hidden_layers} layers over {pp_size} stages is {list(layers)}"
        )
    state = _local_names(model.state_dict())
    sources, silent = _stage_sources(cfg, layers, pp_rank == 0, pp_rank == pp_size - 1, pp_size)
    expected = {source.mcore for source in sources.values()} | set(silent)
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"stage {pp_rank}'s state dict does not match the {cfg.model_type} mapping: "
            f"missing {_listing(missing) or 'none'}; unexpected {_listing(unexpected) or 'none'}"
        )
    dtypes = {tensor.dtype for name, tensor in state.items() if name in expected}
    if len(dtypes) != 1:
        raise ValueError(f"stage {pp_rank}'s weights mix dtypes {sorted(map(str, dtypes))}; the plan needs one")
    dtype = dtypes.pop()
    group = ps.get_tensor_model_parallel_group()
    plan = hf_bucket_plan(cfg, pp_rank, pp_size, bucket_bytes, dtype)
    for name, shape in (entry for planned in plan for entry in planned):
        _check_piece(name, state[sources[name].mcore], sources[name], shape, tp_size)
    device = next(iter(state.values())).device
    bucket_numel = bucket_bytes // torch.empty((), dtype=dtype).element_size()
    assembles = dst is None or ps.get_tensor_model_parallel_rank() == dst
    for planned in plan:
        if not assembles:
            for name, shape in planned:
                _fill_full(None, state[sources[name].mcore], sources[name], group, tp_size, tuple(shape), dst)
            yield []
            continue
        # One fresh buffer per bucket, its tensors consecutive views in plan order (a consumer may move the bucket
        # as one tensor); always the bucket's size at least, so the allocator reuses one block for all of them.
        flat = torch.empty(max(sum(math.prod(shape) for _, shape in planned), bucket_numel), dtype=dtype, device=device)
        bucket, offset = [], 0
        for name, shape in planned:
            view = flat[offset : offset + math.prod(shape)].view(shape)
            _fill_full(view, state[sources[name].mcore], sources[name], group, tp_size, tuple(shape), dst)
            bucket.append((name, view))
            offset += view.numel()
        del flat, view
        yield bucket
        del bucket


# ------------------------------------------------------------------------------ converter's checkpoint


def _shard_path(ckpt_dir: str, tp_rank: int, pp_rank: int) -> str:
    return os.path.join(ckpt_dir, f"mp_rank_{tp_rank:02d}_{pp_rank:03d}", "model.pt")


def save_mcore_shard(shard: Mapping[str, torch.Tensor], out_dir: str | os.PathLike, tp_rank: int, pp_rank: int) -> None:
    """Write one rank's state dict (``_extra_state`` dropped, local-spec names) into a converter checkpoint."""
    path = _shard_path(os.fspath(out_dir), tp_rank, pp_rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(_local_names(shard), path)


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
        _copy_assets(source_dir, assets)
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
    model = _unwrap(model)
    meta, cfg = read_checkpoint_meta(ckpt_dir)
    _check_model_matches(model, cfg, os.fspath(ckpt_dir))
    tp_rank, tp_size, pp_rank, pp_size = _parallel_ranks()
    layers = _model_layers(model)
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


EXPORT_BUCKET_BYTES = 256 * 2**20  # what an export streams at a time (device memory beyond the model)


def export_model_hf(
    model: torch.nn.Module,
    cfg: LlamaConfig,
    out_dir: str | os.PathLike,
    source_dir: str | os.PathLike | None = None,
    *,
    bucket_bytes: int = EXPORT_BUCKET_BYTES,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write a live (TP/PP/DP-sharded) model as one Hugging Face directory; a collective over the default group.

    Each pipeline stage's writer (TP rank 0 of DP rank 0) streams its stage with ``iter_hf_buckets`` (its TP peers
    in lockstep) and writes that stage's safetensors files (at most ``max_shard_bytes`` each, host memory: one
    file); global rank 0 writes the index, config.json (the source's, dtype updated, else one from ``cfg``) and the
    source's tokenizer / generation files. No rank holds the whole model. The directory appears whole or not at
    all: everything is written into ``OUT_DIR.tmp`` beside it and flushed, then rank 0 renames it into place.

    Raises:
        ValueError: the source config describes another model, the model does not fit ``cfg`` or mixes dtypes
            (on the rank at fault; every other rank raises RuntimeError naming it). OSError likewise. Nothing is
            left at ``out_dir`` or ``OUT_DIR.tmp`` after a failure.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    out_dir = os.path.abspath(os.fspath(out_dir))
    tmp = out_dir + ".tmp"
    rank = dist.get_rank()
    tp_rank, _, pp_rank, pp_size = _parallel_ranks()
    streams = ps.get_data_parallel_rank() == 0  # one replica streams; its TP rank 0 of each stage writes
    writer = streams and tp_rank == 0
    state = _local_names(_unwrap(model).state_dict())
    dtype = next(iter(state.values())).dtype
    config: dict = {}

    def prepare() -> None:
        nonlocal config
        if rank == 0:
            config = _export_config(cfg, dtype, source_dir)
            shutil.rmtree(tmp, ignore_errors=True)  # a killed export's leftovers
            os.makedirs(tmp)

    dtypes = _agree(prepare, str(dtype), tmp)
    if len(set(dtypes)) != 1:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"the pipeline stages' weights have different dtypes {sorted(set(dtypes))}")
    files = _weight_files(cfg, pp_size, dtype, max_shard_bytes)

    def write_stage() -> None:
        if not streams:
            return
        pending: dict[str, torch.Tensor] = {}
        stage_files = iter(files[pp_rank])
        file, names = next(stage_files)
        failure: BaseException | None = None
        for bucket in iter_hf_buckets(model, cfg, bucket_bytes, dst=0):  # only the writer assembles tensors
            # After a failure the writer keeps consuming: its TP peers are still gathering with it.
            if writer and failure is None:
                try:
                    for name, tensor in bucket:
                        pending[name] = tensor.to("cpu", copy=True)  # its own storage: the bucket's is shared
                        if len(pending) == len(names):
                            _save_weight_file({n: pending[n] for n in names}, os.path.join(tmp, file))
                            pending.clear()
                            file, names = next(stage_files, (None, []))
                except Exception as exc:  # noqa: BLE001 - re-raised after the stream ends
                    failure, pending = exc, {}
            del bucket  # before the next one is gathered: one bucket at a time
        if failure is not None:
            raise failure
        if writer and file is not None:
            raise RuntimeError(f"stage {pp_rank}'s stream ended before {file} was complete")

    _agree(write_stage, None, tmp)

    def publish() -> None:
        if rank == 0:
            _write_metadata(tmp, cfg, config, files, dtype, source_dir)
            _fsync(tmp)
            old = out_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            if os.path.lexists(out_dir):
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)

    _agree(publish, None, tmp)


def _agree(step: Callable[[], None], value, tmp: str) -> list:
    """Run ``step`` on every rank, then learn every rank's outcome (a collective over the default group).

    Returns every rank's ``value``. When any rank failed, rank 0 removes ``tmp``; the failing rank re-raises its
    own exception and the others raise RuntimeError naming it, so no rank is left waiting in a later collective.
    """
    import torch.distributed as dist

    failure: BaseException | None = None
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below
        failure = exc
    outcomes: list = [None] * dist.get_world_size()
    mine = (None if failure is None else f"{type(failure).__name__}: {failure}", value)
    dist.all_gather_object(outcomes, mine)
    failed = [(r, message) for r, (message, _) in enumerate(outcomes) if message is not None]
    if failed:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure
        raise RuntimeError("the Hugging Face export failed on " + "; ".join(f"rank {r}: {m}" for r, m in failed))
    return [v for _, v in outcomes]

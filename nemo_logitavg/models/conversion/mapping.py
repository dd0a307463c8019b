"""Hugging Face names <-> megatron-core ``GPTModel`` shards, read from the family's table (``models/families/``).

For global layer ``i`` (local index ``j`` on its pipeline stage), TP rank ``r`` of ``t``, Llama's table reads:

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
which is megatron's default (``rotary_interleaved=False``), so no row permutation is needed. With Transformer
Engine's layer spec (GPUs), the two layer norms are fused into ``linear_qkv.layer_norm_weight`` and
``linear_fc1.layer_norm_weight``; ``local_names`` translates those names.

Both ways out of megatron (``mcore_to_hf_state_dict`` offline, ``streaming.iter_hf_buckets`` live) read the
per-tensor sources of ``stage_sources``: one mapping. Nothing here needs torch.distributed or megatron.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from nemo_logitavg.models.builder import LlamaConfig, padded_vocab_size
from nemo_logitavg.models.families import family_of
from nemo_logitavg.models.families.table import (
    GATE_UP_PARTS,
    HF_LAYER,
    MCORE_LAYER,
    QKV_PARTS,
    Layout,
    Weight,
    dimensions,
)

IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older exports carry; recomputed on load
EXTRA_STATE = "_extra_state"
# Transformer Engine's spec fuses the pre-attention / pre-MLP norms into the following linear layer:
# (local spec's name, Transformer Engine's name).
TE_FUSED_NORMS = (
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


def _stage_weights(cfg: LlamaConfig, layers: Iterable[int], first: bool, last: bool) -> list[tuple[str, str, Weight]]:
    """``(hf name, megatron name on the stage, table entry)`` of a pipeline stage's Hugging Face tensors, in the
    table's order; ``layers`` are the stage's global layer numbers (local layer ``j`` is the j-th). Tied outputs
    (``Weight.tied_to``) are left out."""
    family = family_of(cfg)

    def present(tensors: Sequence[Weight]) -> list[Weight]:
        return [t for t in tensors if not (t.tied_to and cfg.tie_word_embeddings)]

    out = [(t.hf, t.mcore, t) for t in present(family.first)] if first else []
    for local, i in enumerate(layers):
        hf, mcore = HF_LAYER.format(i), MCORE_LAYER.format(local)
        out += [(hf + t.hf, mcore + t.mcore, t) for t in family.layer]
    if last:
        out += [(t.hf, t.mcore, t) for t in present(family.last)]
    return out


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face weight of ``cfg`` with its shape, in the family table's order."""
    dims = dimensions(cfg)
    tensors = _stage_weights(cfg, range(cfg.num_hidden_layers), True, True)
    return {hf: tuple(dims[d] for d in t.shape) for hf, _, t in tensors}


def stage_hf_names(cfg: LlamaConfig, pp_rank: int, pp_size: int) -> list[str]:
    """The Hugging Face tensor names pipeline stage pp_rank owns, in a fixed order: model.embed_tokens.weight on
    stage 0; its layers' tensors (global layer numbers, stage_layers()); model.norm.weight and lm_head.weight
    (untied only) on the last stage. Tied embeddings appear once (stage 0)."""
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} is outside pipeline_parallel_size={pp_size}")
    layers = stage_layers(cfg.num_hidden_layers, pp_rank, pp_size)
    return [hf for hf, _, _ in _stage_weights(cfg, layers, pp_rank == 0, pp_rank == pp_size - 1)]


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


def listing(keys: Iterable[str], limit: int = 12) -> str:
    """``keys`` sorted, comma-separated, the first ``limit`` of them and how many more."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_hf_state(hf_state: Mapping[str, torch.Tensor], cfg: LlamaConfig, source: str = "the HF state") -> None:
    """Raise ValueError naming missing and unexpected Hugging Face keys (before any tensor is read)."""
    expected = set(hf_shapes(cfg))
    present = set(hf_state.keys())
    missing = expected - present
    family = family_of(cfg)
    tied = {t.hf for t in (*family.first, *family.last) if t.tied_to} if cfg.tie_word_embeddings else set()
    unexpected = {k for k in present - expected if not k.endswith(IGNORED_HF_SUFFIXES) and k not in tied}
    problems = []
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if problems:
        raise ValueError(f"{source} does not match the Llama config: " + "; ".join(problems))


# ------------------------------------------------------------------------------------ HF -> megatron


def _by_module(tensors: list[tuple[str, str, Weight]]) -> dict[str, list[tuple[str, Weight]]]:
    """Megatron name -> its Hugging Face sources ``(hf name, entry)``, megatron names in the order of their
    modules' first appearance, a module's tensors in order (``linear_qkv.weight`` before ``linear_qkv.bias``)."""
    modules: dict[str, dict[str, list[tuple[str, Weight]]]] = {}
    for hf, mcore, entry in tensors:
        modules.setdefault(mcore.rpartition(".")[0], {}).setdefault(mcore, []).append((hf, entry))
    return {mcore: sources for module in modules.values() for mcore, sources in module.items()}


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
        hf_state: Hugging Face names to tensors (a dict, or the lazy mapping of ``hf_files.read_hf_state``).
        cfg: the model's shape; ``LlamaConfig.from_hf`` of the same directory.
        tp_rank, tp_size, pp_rank, pp_size: this rank's place in the model-parallel grid.
        padded_vocab: rows of the full embedding after padding; by default the builder's padding
            (``padded_vocab_size(cfg.vocab_size, tp_size)``).
        layers: global indices of this stage's layers; by default megatron's even split.

    Returns fresh tensors (no views of ``hf_state``) in ``hf_state``'s dtype, shaped as this rank's parameters
    (e.g. ``linear_qkv.weight`` ``[(heads + 2 kv_heads) * head_dim / tp, hidden]``, the embedding
    ``[padded_vocab / tp, hidden]``), and no ``_extra_state`` entries. The last stage at PP > 1 of a tied model
    holds its own copy of the embedding as ``output_layer.weight``.

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

    def qkv(parts: dict[str, torch.Tensor]) -> torch.Tensor:  # [g * (q_rows + 2 d), ...] -> this rank's groups
        grouped = [parts[p].reshape(cfg.num_key_value_heads, -1, *parts[p].shape[1:]) for p in QKV_PARTS]
        fused = rows(torch.cat(grouped, dim=1))
        return fused.reshape(-1, *fused.shape[2:])

    def gate_up(parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([rows(parts[p]) for p in GATE_UP_PARTS])

    combine: dict[Layout, Callable[[dict[str, torch.Tensor]], torch.Tensor]] = {
        Layout.REPLICATED: lambda parts: parts[None],
        Layout.VOCAB: lambda parts: vocab(parts[None]),
        Layout.SPLIT_COLUMNS: lambda parts: cols(parts[None]),
        Layout.QKV: qkv,
        Layout.GATE_UP: gate_up,
    }
    out: dict[str, torch.Tensor] = {}
    for mcore, sources in _by_module(_stage_weights(cfg, layers, first, last)).items():
        out[mcore] = combine[sources[0][1].layout]({entry.part: get(hf) for hf, entry in sources})
    if last and cfg.tie_word_embeddings and pp_size > 1:  # the last stage keeps its own copy of the embedding
        for t in family_of(cfg).last:
            if t.tied_to:
                out[t.mcore] = vocab(get(t.tied_to))
    return {name: tensor.clone() for name, tensor in out.items()}


# ------------------------------------------------------------------------------------ megatron -> HF


def local_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Megatron state with Transformer Engine's fused norm names mapped to the local spec's, extra state dropped."""
    out = {}
    for name, value in state.items():
        if name.endswith(EXTRA_STATE):
            continue
        for local, te in TE_FUSED_NORMS:
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
class HFSource:
    """Where one Hugging Face tensor lives on its pipeline stage: the one mapping both directions of export use."""

    mcore: str  # megatron-core name on the stage (local layer number, local-spec norm names)
    piece: Callable[[torch.Tensor], torch.Tensor] | None  # this TP rank's part, cut from its shard (None: all of it)
    dim: int | None  # TP ranks' parts are concatenated on this dimension; None: replicated (TP rank 0's copy)
    rows: int | None = None  # keep the first rows only (vocabulary padding removed)


def stage_sources(
    cfg: LlamaConfig, layers: Sequence[int], first: bool, last: bool, pp_size: int
) -> tuple[dict[str, HFSource], list[str]]:
    """The Hugging Face tensors of one pipeline stage (in ``hf_shapes`` order) and where each comes from, plus the
    megatron names the stage holds that export nothing (the last stage's copy of a tied embedding).

    ``layers`` are the stage's global layer numbers; local layer ``j`` is ``layers[j]``.
    """
    groups, d = cfg.num_key_value_heads, cfg.head_dim
    q_rows = cfg.num_attention_heads // groups * d
    per_group = q_rows + 2 * d
    # linear_qkv holds, per query group, its query heads, key head and value head (rows of head_dim each).
    spans = {"q": (0, q_rows), "k": (q_rows, q_rows + d), "v": (q_rows + d, per_group)}

    def qkv(which: str) -> Callable[[torch.Tensor], torch.Tensor]:  # weights [rows, hidden] and biases [rows]
        lo, hi = spans[which]
        return lambda t: t.reshape(-1, per_group, *t.shape[1:])[:, lo:hi].reshape(-1, *t.shape[1:])

    def fc1(half: int) -> Callable[[torch.Tensor], torch.Tensor]:  # [gate_r; up_r] on each rank
        return lambda t: t.chunk(2)[half]

    def source(mcore: str, entry: Weight) -> HFSource:
        if entry.layout is Layout.REPLICATED:
            return HFSource(mcore, None, None)
        if entry.layout is Layout.VOCAB:
            return HFSource(mcore, None, 0, cfg.vocab_size)
        if entry.layout is Layout.SPLIT_COLUMNS:
            return HFSource(mcore, None, 1)
        if entry.layout is Layout.QKV:
            return HFSource(mcore, qkv(entry.part), 0)
        return HFSource(mcore, fc1(GATE_UP_PARTS.index(entry.part)), 0)

    sources = {hf: source(mcore, entry) for hf, mcore, entry in _stage_weights(cfg, layers, first, last)}
    silent = []
    if last and cfg.tie_word_embeddings and pp_size > 1:
        silent += [t.mcore for t in family_of(cfg).last if t.tied_to]  # the last stage's copy of the embedding
    return sources, silent


def mcore_to_hf_state_dict(
    shards: Sequence[Sequence[Mapping[str, torch.Tensor]]], cfg: LlamaConfig
) -> dict[str, torch.Tensor]:
    """Merge every model-parallel rank's ``GPTModel`` state dict into Hugging Face names (vocab padding removed).

    Args:
        shards: ``shards[pp_rank][tp_rank]`` is that rank's ``model.state_dict()`` (``_extra_state`` entries and
            Transformer Engine's fused norm names are accepted).
        cfg: the model's shape.

    Returns full Hugging Face tensors (``hf_shapes(cfg)``, in its order) in the shards' dtype, on the CPU.

    Raises:
        ValueError: a shard misses keys or has keys the mapping does not know (named), or the grid is ragged.
    """
    pp_size = len(shards)
    tp_size = len(shards[0]) if pp_size else 0
    if pp_size == 0 or tp_size == 0 or any(len(stage) != tp_size for stage in shards):
        raise ValueError("shards must be a non-empty [pp_rank][tp_rank] grid with the same TP size on every stage")
    check_parallel_layout(cfg, tp_size)
    grid = [[local_names(s) for s in stage] for stage in shards]
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
        sources, silent = stage_sources(cfg, range(offset, offset + count), pp == 0, pp == pp_size - 1, pp_size)
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
        raise ValueError(f"megatron shards have keys the {cfg.model_type} mapping does not know: {listing(unexpected)}")
    return {name: out[name] for name in hf_shapes(cfg)}

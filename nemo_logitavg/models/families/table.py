"""The form of a model family's mapping table: the Hugging Face tensors of a decoder, their shapes, and where each
lives in megatron-core's ``GPTModel``.

A table is data. ``models/conversion/mapping.py`` reads it for both directions (Hugging Face -> megatron shards,
megatron shards or a live model -> Hugging Face), ``hf_shapes`` and the push's bucket plan; the builder reads the
family's architecture, model_type and the config flags it refuses.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the builder imports this module: the config class is named for type hints only
    from nemo_logitavg.models.builder import LlamaConfig

# Layer ``i`` of the Hugging Face model / local layer ``j`` of a pipeline stage in megatron-core.
HF_LAYER = "model.layers.{}."
MCORE_LAYER = "decoder.layers.{}."


class Layout(enum.Enum):
    """How a Hugging Face tensor sits in megatron-core's model across the ``t`` tensor-parallel ranks."""

    REPLICATED = "replicated"  # the whole tensor on every TP rank (norms)
    VOCAB = "vocab"  # rows padded with zeros to the padded vocabulary, then split on rows (dim 0) in t
    SPLIT_COLUMNS = "split_columns"  # RowParallelLinear: the input dimension (dim 1) split in t
    # One of q / k / v fused into ``linear_qkv`` in megatron's per-query-group layout: for each of the
    # ``num_key_value_heads`` groups, its query heads, then its key head, then its value head (``head_dim`` rows
    # each); TP ranks hold whole groups. A bias follows its weight rows.
    QKV = "qkv"
    GATE_UP = "gate_up"  # one of gate / up fused into ``linear_fc1`` as [gate_r; up_r] on each TP rank r


QKV_PARTS = ("q", "k", "v")  # the order of a query group's rows in linear_qkv
GATE_UP_PARTS = ("gate", "up")  # the order of a TP rank's halves of linear_fc1


@dataclass(frozen=True)
class Weight:
    """One Hugging Face tensor and its place in megatron-core.

    ``hf`` and ``mcore`` are full names for the embedding / final tensors and relative to ``HF_LAYER`` /
    ``MCORE_LAYER`` for a layer's. ``shape`` is the full Hugging Face shape in dimension names (``dimensions``).
    ``part`` names the slice of a fused tensor (``QKV_PARTS`` for ``Layout.QKV``, ``GATE_UP_PARTS`` for
    ``Layout.GATE_UP``). ``tied_to``: the tensor is absent when the config ties word embeddings; megatron's last
    pipeline stage then holds its own copy of ``tied_to`` under ``mcore`` when there are several stages.
    """

    hf: str
    mcore: str
    shape: tuple[str, ...]
    layout: Layout
    part: str | None = None
    tied_to: str | None = None

    def __post_init__(self) -> None:
        parts = {Layout.QKV: QKV_PARTS, Layout.GATE_UP: GATE_UP_PARTS}.get(self.layout)
        if (self.part is None) != (parts is None) or (parts is not None and self.part not in parts):
            raise ValueError(f"{self.hf}: part {self.part!r} does not fit layout {self.layout.name}")


# The ends of every decoder family: the embedding on the first pipeline stage, the final norm and the output layer
# on the last.
EMBED_TOKENS = Weight(
    "model.embed_tokens.weight", "embedding.word_embeddings.weight", ("vocab", "hidden"), Layout.VOCAB
)
FINAL_NORM = Weight("model.norm.weight", "decoder.final_layernorm.weight", ("hidden",), Layout.REPLICATED)
LM_HEAD = Weight(
    "lm_head.weight", "output_layer.weight", ("vocab", "hidden"), Layout.VOCAB, tied_to="model.embed_tokens.weight"
)

# The Llama decoder layer's two halves, in Hugging Face order; a family lists them with what it adds in between
# (Qwen2's q/k/v biases come after o_proj).
ATTENTION = (
    Weight("input_layernorm.weight", "input_layernorm.weight", ("hidden",), Layout.REPLICATED),
    Weight("self_attn.q_proj.weight", "self_attention.linear_qkv.weight", ("q", "hidden"), Layout.QKV, "q"),
    Weight("self_attn.k_proj.weight", "self_attention.linear_qkv.weight", ("kv", "hidden"), Layout.QKV, "k"),
    Weight("self_attn.v_proj.weight", "self_attention.linear_qkv.weight", ("kv", "hidden"), Layout.QKV, "v"),
    Weight("self_attn.o_proj.weight", "self_attention.linear_proj.weight", ("hidden", "q"), Layout.SPLIT_COLUMNS),
)
MLP = (
    Weight("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", ("hidden",), Layout.REPLICATED),
    Weight("mlp.gate_proj.weight", "mlp.linear_fc1.weight", ("ffn", "hidden"), Layout.GATE_UP, "gate"),
    Weight("mlp.up_proj.weight", "mlp.linear_fc1.weight", ("ffn", "hidden"), Layout.GATE_UP, "up"),
    Weight("mlp.down_proj.weight", "mlp.linear_fc2.weight", ("hidden", "ffn"), Layout.SPLIT_COLUMNS),
)


@dataclass(frozen=True)
class ModelFamily:
    """One model family's mapping table.

    ``first`` / ``layer`` / ``last`` are the tensors of the first stage, of each decoder layer and of the last
    stage, each in Hugging Face order: the order of ``hf_shapes``, the files written and the push's buckets.
    Megatron tensors come in the order of their modules' first appearance, a module's tensors in order
    (``linear_qkv.weight`` then ``linear_qkv.bias``). ``refused_flags``: Hugging Face config flags the builder
    cannot reproduce when true, with what they would add. ``export_config``: the family's own ``config.json`` keys
    for a config written from a ``LlamaConfig`` (no source config to copy).
    """

    model_type: str
    architecture: str
    first: tuple[Weight, ...]
    layer: tuple[Weight, ...]
    last: tuple[Weight, ...]
    export_config: Callable[[LlamaConfig], Mapping[str, Any]]
    refused_flags: tuple[tuple[str, str], ...] = ()

    @property
    def qkv_bias(self) -> bool:
        """Whether ``linear_qkv`` has a bias (megatron's ``add_qkv_bias``)."""
        return any(t.layout is Layout.QKV and t.hf.endswith(".bias") for t in self.layer)


def dimensions(cfg: LlamaConfig) -> dict[str, int]:
    """The sizes the tables' shapes name."""
    return {
        "vocab": cfg.vocab_size,
        "hidden": cfg.hidden_size,
        "ffn": cfg.intermediate_size,
        "q": cfg.num_attention_heads * cfg.head_dim,
        "kv": cfg.num_key_value_heads * cfg.head_dim,
    }

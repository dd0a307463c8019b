"""Build a Llama-family decoder (RMSNorm, SwiGLU, rotary, grouped-query attention) as a megatron-core GPTModel.

The families (``models/families/``) are Llama 2/3 (``LlamaForCausalLM``, including Llama 3.x's ``llama3`` rope
scaling) and Qwen2 (``Qwen2ForCausalLM``: the same decoder with biases on the q/k/v projections).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nemo_logitavg.models.families import FAMILIES
from nemo_logitavg.models.families.table import ModelFamily
from nemo_logitavg.parallel import rank_device

# megatron-core applies Llama 3.1's rope scaling with only the factor configurable: these are the defaults of
# ``RotaryEmbedding._apply_scaling`` in megatron/core/models/common/embeddings/rotary_pos_embedding.py, which
# GPTModel never overrides. A checkpoint with other values cannot be reproduced.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_rope_mismatches(low_freq_factor: float, high_freq_factor: float, original_max_position_embeddings: int):
    """The llama3 rope constants that differ from megatron-core's hard-coded ones, as ``name=value`` strings."""
    given = {
        "low_freq_factor": low_freq_factor,
        "high_freq_factor": high_freq_factor,
        "original_max_position_embeddings": original_max_position_embeddings,
    }
    return [f"{name}={value} (megatron uses {MEGATRON_LLAMA3_ROPE[name]})"
            for name, value in given.items() if value != MEGATRON_LLAMA3_ROPE[name]]  # fmt: skip


def _read_hf_config(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """A Hugging Face ``config.json`` as a dict, and the name of where it came from (for error messages)."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), "the given config dict"
    source = os.fspath(path_or_dict)
    if os.path.isdir(source):
        source = os.path.join(source, "config.json")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"no Hugging Face config.json at {source}")
    with open(source, encoding="utf-8") as f:
        return json.load(f), source


def _check_family(hf: Mapping[str, Any], refuse: Callable[[str], ValueError]) -> ModelFamily:
    """The family table of ``hf``; refuses an architecture or model_type without a table, a mismatch of the two,
    or a flag the family's table marks as unsupported."""
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for arch in architectures:
        if arch not in {family.architecture for family in FAMILIES.values()}:
            raise refuse(f"architecture {arch} is not supported")
    if model_type not in FAMILIES:
        raise refuse(f"model_type {model_type!r} is not supported")
    family = FAMILIES[model_type]
    if any(arch != family.architecture for arch in architectures):
        raise refuse(f"architectures {architectures} do not match model_type {model_type!r}")
    for flag, what in family.refused_flags:  # e.g. Llama's biases (Qwen2's are fixed by its architecture)
        if hf.get(flag):
            raise refuse(f"{flag}=true is not supported (the builder has no {what})")
    return family


def _rope_scaling(hf: Mapping[str, Any], rope: Mapping[str, Any], refuse: Callable[[str], ValueError]) -> dict:
    """LlamaConfig's rope-scaling fields from the merged rope settings: none for unscaled rotary, megatron-core's
    llama3 scaling where its constants match; anything else is refused."""
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise refuse(f"partial_rotary_factor={partial} is not supported (only full rotary embeddings)")
    scaling: dict[str, Any] = {}
    if rope_type == "llama3":
        names = ("factor", *MEGATRON_LLAMA3_ROPE)
        absent = [name for name in names if rope.get(name) is None]
        if absent:
            raise refuse(f"llama3 rope scaling without {', '.join(absent)}")
        wrong = llama3_rope_mismatches(*(rope[name] for name in MEGATRON_LLAMA3_ROPE))
        if wrong:
            raise refuse(
                f"llama3 rope scaling with {', '.join(wrong)} is not supported (megatron-core hard-codes "
                "them in RotaryEmbedding._apply_scaling, megatron/core/models/common/embeddings/"
                "rotary_pos_embedding.py; only the factor is configurable)"
            )
        scaling = {
            "rope_scaling_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope["low_freq_factor"]),
            "rope_high_freq_factor": float(rope["high_freq_factor"]),
            "rope_original_max_position_embeddings": int(rope["original_max_position_embeddings"]),
        }
    elif rope_type != "default":
        raise refuse(f"rope scaling of type {rope_type!r} is not supported (only unscaled rotary or llama3)")
    return scaling


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-family decoder; names follow Hugging Face's ``LlamaConfig``.

    ``rope_scaling_factor`` is Llama 3.x's ``llama3`` rope scaling (None: unscaled rotary embeddings); the
    ``rope_*`` constants after it only apply with a factor and must equal ``MEGATRON_LLAMA3_ROPE``.
    ``qkv_bias`` is Qwen2's biases on the q/k/v projections (no bias on o_proj or the MLP); a config with
    it is exported as ``Qwen2ForCausalLM``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float = MEGATRON_LLAMA3_ROPE["low_freq_factor"]
    rope_high_freq_factor: float = MEGATRON_LLAMA3_ROPE["high_freq_factor"]
    rope_original_max_position_embeddings: int = MEGATRON_LLAMA3_ROPE["original_max_position_embeddings"]
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        if self.rope_scaling_factor is not None:
            wrong = llama3_rope_mismatches(
                self.rope_low_freq_factor, self.rope_high_freq_factor, self.rope_original_max_position_embeddings
            )
            if wrong:
                raise ValueError(f"llama3 rope scaling with {', '.join(wrong)} is not supported by megatron-core")

    @property
    def model_type(self) -> str:
        """Hugging Face ``model_type`` of this config, the key of its family in ``models.families.FAMILIES``:
        ``qwen2`` with q/k/v biases, else ``llama``."""
        return "qwen2" if self.qkv_bias else "llama"

    @property
    def head_dim(self) -> int:
        """Rows of one attention head: ``hidden_size / num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> LlamaConfig:
        """Read a Hugging Face ``config.json`` (a directory, the file itself, or its parsed dict).

        Both the transformers 4 layout (``rope_theta``, ``rope_scaling``) and the 5 layout
        (``rope_parameters``) are read. Only what the builder can reproduce exactly is accepted: Llama
        (unscaled or ``llama3`` rope scaling with megatron-core's constants) and Qwen2 (q/k/v biases, full
        attention in every layer).

        Raises:
            ValueError: for an architecture other than ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``, a
                ``model_type`` other than ``llama`` / ``qwen2`` or one that disagrees with the architecture
                (the message names it and the file), or an option the builder does not implement (Llama's
                attention or MLP biases, rope scaling other than llama3 or with other llama3 constants than
                megatron's, sliding-window attention, a non-SiLU activation, a custom head_dim).
            FileNotFoundError: when the directory has no ``config.json``.
        """
        hf, source = _read_hf_config(path_or_dict)

        def refuse(what: str) -> ValueError:
            supported = ", ".join(f"{f.architecture} (model_type {mt!r})" for mt, f in FAMILIES.items())
            return ValueError(f"{source}: {what}; supported: {supported}")

        family = _check_family(hf, refuse)
        if hf.get("use_sliding_window"):
            raise refuse("use_sliding_window=true is not supported (only full attention)")
        sliding = sorted({t for t in hf.get("layer_types") or [] if t != "full_attention"})
        if sliding:
            raise refuse(f"layer_types {sliding} are not supported (only full_attention)")
        if hf.get("hidden_act", "silu") != "silu":
            raise refuse(f"hidden_act={hf['hidden_act']!r} is not supported (only silu)")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim * heads != hf["hidden_size"]:
            raise refuse(f"head_dim={head_dim} != hidden_size / num_attention_heads is not supported")

        # transformers 5 writes rope_parameters (rope_theta inside); 4 writes rope_theta and rope_scaling.
        rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
        scaling = _rope_scaling(hf, rope, refuse)
        rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        if not rope_theta.is_integer():  # megatron-core takes an integer rotary base
            raise refuse(f"a non-integer rope_theta={rope_theta} is not supported")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=rope_theta,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family.qkv_bias,
            **scaling,
        )


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron's padding: the smallest multiple of ``divisible_by * tensor_parallel_size`` >= vocab_size."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def _layer_spec():
    # Transformer Engine's fused layers when TE itself imports and CUDA is there (NGC container, GPU); megatron's
    # local layers otherwise. Asking megatron for the TE spec is not a test of TE: without TE, megatron-core 0.16's
    # gpt_layer_specs imports but never defines TESpecProvider, and the TE spec raises NameError.
    # Imported here: TE is optional, megatron-core heavy (~3 s) and the config imports this module without it.
    try:
        import transformer_engine  # noqa: F401
    except (ImportError, RuntimeError, OSError):  # TE raises RuntimeError on CPU-only machines
        has_te = False
    else:
        has_te = True
    if has_te and torch.cuda.is_available():
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm")


def build_gpt_model(
    cfg: LlamaConfig,
    tensor_parallel_size: int = 1,
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool = True,
    post_process: bool = True,
    make_vocab_size_divisible_by: int = 128,
    pipeline_parallel_size: int = 1,
):
    """A megatron-core ``GPTModel`` for ``cfg`` on this rank's TP shard and PP stage, on ``rank_device()``.

    Without CUDA, weights are initialised on the CPU from the full matrices and then split, so a given
    ``torch.manual_seed`` yields the same model at every TP size. With CUDA each rank initialises only its own
    shard on its GPU (initialising every full matrix on the host would take minutes at 70B; real runs load
    weights over the initial values anyway). The last
    stage returns vocab-parallel logits ``[batch, seq, padded_vocab / TP]``; other stages return hidden
    states ``[seq, batch, hidden]``. Under PP each stage builds ``num_hidden_layers / PP`` layers.
    ``cfg.qkv_bias`` gives ``linear_qkv`` a bias (``add_qkv_bias``); ``cfg.rope_scaling_factor`` turns on
    megatron's Llama 3.1 rope scaling (``rope_scaling=True``).

    Raises:
        ValueError: when ``tensor_parallel_size`` does not divide the attention heads or the query groups, or
            ``pipeline_parallel_size`` does not divide the layers.
    """
    # megatron-core is heavy (~3 s): the config and the offline converter import this module without it
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    for what, count in (
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
    ):
        if count % tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} does not divide {what}={count}")
    if cfg.num_hidden_layers % pipeline_parallel_size:
        raise ValueError(
            f"pipeline_parallel_size={pipeline_parallel_size} does not divide num_hidden_layers={cfg.num_hidden_layers}"
        )
    config = TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    device = rank_device()
    model = GPTModel(
        config,
        _layer_spec(),
        vocab_size=padded_vocab_size(cfg.vocab_size, tensor_parallel_size, make_vocab_size_divisible_by),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
        rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor if cfg.rope_scaling_factor is not None else 8.0,
    )
    # megatron puts parameters on the current CUDA device (which init_parallel set to rank_device()); the move
    # catches anything built on the host (some norms, buffers). A no-op on the CPU.
    return model.to(device)

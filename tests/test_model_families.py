"""Each model family's mapping table is the single source of its tensor names: checked against models that
transformers (Hugging Face names) and megatron-core (GPTModel names) build themselves, and the builder refuses a
family the registry does not hold, naming the field."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from safetensors import safe_open

from nemo_logitavg.models.builder import LlamaConfig
from nemo_logitavg.models.conversion.mapping import hf_shapes
from nemo_logitavg.models.families import FAMILIES, family_of
from nemo_logitavg.models.families.table import HF_LAYER, MCORE_LAYER, dimensions
from tests.distributed import run_distributed
from tests.tiny_models import make_tiny_family

# (model_type, tied word embeddings): every family with and without tying.
CASES = [(model_type, tied) for model_type in FAMILIES for tied in (False, True)]


def _table(cfg: LlamaConfig, side: str) -> Counter:
    """Every full name (side "hf" or "mcore", one pipeline stage) the family's table produces, with its count;
    tied outputs left out."""
    family = family_of(cfg)
    names: Counter = Counter()
    for t in (*family.first, *family.last):
        if not (t.tied_to and cfg.tie_word_embeddings):
            names[getattr(t, side)] += 1
    prefix = HF_LAYER if side == "hf" else MCORE_LAYER
    for i in range(cfg.num_hidden_layers):
        names.update(prefix.format(i) + getattr(t, side) for t in family.layer)
    return names


@pytest.mark.parametrize("model_type,tied", CASES)
def test_every_transformers_tensor_is_covered_once_by_its_family_table(tmp_path, model_type, tied):
    path = Path(make_tiny_family(tmp_path, model_type, tied))
    config = json.loads((path / "config.json").read_text())
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    cfg = LlamaConfig.from_hf(path)
    family = family_of(cfg)
    assert (family.model_type, [family.architecture]) == (model_type, config["architectures"])

    covered = _table(cfg, "hf")
    assert set(covered) == set(saved) and set(covered.values()) == {1}, (
        f"not in the table: {sorted(set(saved) - set(covered))}; not saved by transformers: "
        f"{sorted(set(covered) - set(saved))}; more than once: {sorted(n for n, c in covered.items() if c > 1)}"
    )
    dims = dimensions(cfg)
    entries = {t.hf: t for t in (*family.first, *family.last)}
    entries |= {HF_LAYER.format(i) + t.hf: t for i in range(cfg.num_hidden_layers) for t in family.layer}
    assert {name: tuple(dims[d] for d in entries[name].shape) for name in saved} == saved
    assert hf_shapes(cfg) == saved  # the mapping reads the table: same names and shapes as transformers'


def _megatron_names(cases: list[tuple[str, bool]], root: str) -> list[list[str]]:
    from nemo_logitavg.models.builder import build_gpt_model
    from nemo_logitavg.parallel import init_parallel, teardown

    init_parallel()
    names = []
    for model_type, tied in cases:
        model = build_gpt_model(LlamaConfig.from_hf(f"{root}/{model_type}_{tied}"))
        names.append(sorted(k for k in model.state_dict() if not k.endswith("_extra_state")))
    teardown()
    return names


@pytest.mark.slow
def test_every_megatron_tensor_is_covered_by_its_family_table(tmp_path):
    """The table's megatron names are exactly the GPTModel's (local spec, one stage): a fused tensor is named by
    every part it holds (q, k, v of linear_qkv; gate, up of linear_fc1), any other by one entry."""
    for model_type, tied in CASES:
        make_tiny_family(tmp_path / f"{model_type}_{tied}", model_type, tied)
    (names,) = run_distributed(_megatron_names, 1, cases=CASES, root=str(tmp_path))
    for (model_type, tied), megatron in zip(CASES, names, strict=True):
        cfg = LlamaConfig.from_hf(tmp_path / f"{model_type}_{tied}")
        family = family_of(cfg)
        assert sorted(_table(cfg, "mcore")) == megatron, (model_type, tied)
        parts = Counter(t.mcore for t in family.layer)
        for t in family.layer:
            assert parts[t.mcore] == {"qkv": 3, "gate_up": 2}.get(t.layout.value, 1), (model_type, t)


@pytest.mark.parametrize(
    "model_type,architecture",
    [("qwen3", "Qwen3ForCausalLM"), ("qwen3_moe", "Qwen3MoeForCausalLM"), ("mistral", "MistralForCausalLM")],
)
def test_a_family_without_a_table_is_refused_naming_the_field(tmp_path, model_type, architecture):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type).to_dict()
    assert model_type not in FAMILIES
    path = tmp_path / "config.json"
    fields = (([architecture], f"architecture {architecture}"), (None, f"model_type {model_type!r}"))
    for architectures, field in fields:
        path.write_text(json.dumps({**config, "architectures": architectures}))
        with pytest.raises(ValueError) as info:
            LlamaConfig.from_hf(path)
        message = str(info.value)
        assert message.startswith(f"{path}: {field} is not supported; supported: "), message
        for family in FAMILIES.values():  # and says what is
            assert f"{family.architecture} (model_type {family.model_type!r})" in message

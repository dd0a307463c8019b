"""The YAML config loader: typed values, command-line overrides, errors that name the file and key."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from nemo_logitavg.config import load_config


@dataclass
class Inner:
    width: int = 4


@dataclass
class Schema:
    inner: Inner = field(default_factory=Inner)
    rate: float = 0.5
    name: str = "x"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  width: 8\nrate: 0.25\n")
    cfg = load_config(Schema, path, ["inner.width=16", "name=run1"])
    assert isinstance(cfg, Schema) and isinstance(cfg.inner, Inner)
    assert (cfg.inner.width, cfg.rate, cfg.name) == (16, 0.25, "run1")


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        ("inner:\n  widht: 8\n", [], r"c\.yaml.*widht"),
        ("rate: fast\n", [], r"c\.yaml.*rate"),
        ("rate: 0.1\n", ["inner.width=wide"], r"override.*inner\.width"),
        ("rate: 0.1\n", ["nosuchkey=1"], r"override.*nosuchkey"),
    ],
)
def test_errors_name_the_key(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(Schema, path, overrides)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(Schema, tmp_path / "absent.yaml")


def test_shipped_check_config_loads():
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("pimix_tp_check", root / "recipes" / "pimix_tp_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's namespace
    spec.loader.exec_module(module)
    cfg = load_config(module.CheckConfig, root / "configs" / "pimix_check.yaml")
    assert cfg.model.num_key_value_heads == 2 and 0.0 <= cfg.ref_weight <= 1.0


def test_shipped_training_configs_load_and_validate():
    from pathlib import Path

    from nemo_logitavg.config import GRPOConfig, SFTConfig

    root = Path(__file__).resolve().parent.parent / "configs"
    sft = load_config(SFTConfig, root / "sft.yaml", ["model=m", "data=d.jsonl", "out=o"])
    assert sft.sequences_per_step % sft.micro_batch_size == 0
    grpo = load_config(GRPOConfig, root / "grpo_logitavg_tiny.yaml", ["model.policy=p", "data.train=t"]).validate()
    assert grpo.model.tensor_parallel == 2 and grpo.algorithm.ref_weight == 0.5
    with pytest.raises(ValueError, match="required key"):
        load_config(GRPOConfig, root / "grpo_logitavg_tiny.yaml")

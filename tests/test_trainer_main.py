"""The training entry point's command line: ``{sft,grpo} CONFIG [key=value ...]`` and the recipes' ``--config``."""

from __future__ import annotations

import pytest

from nemo_logitavg.trainer.main import RUNS, parse_command, run_grpo, run_sft


def test_module_command_names_the_run_then_the_config():
    assert parse_command(["grpo", "c.yaml", "run.steps=3", "algorithm.beta=0.1"]) == (
        "grpo", "c.yaml", ["run.steps=3", "algorithm.beta=0.1"])  # fmt: skip
    assert parse_command(["sft", "c.yaml"]) == ("sft", "c.yaml", [])
    with pytest.raises(SystemExit):
        parse_command(["ppo", "c.yaml"])


def test_recipe_command_takes_config_flag():
    assert parse_command(["--config", "c.yaml", "steps=2"], recipe="sft") == ("sft", "c.yaml", ["steps=2"])
    with pytest.raises(SystemExit):
        parse_command(["c.yaml"], recipe="grpo")  # a recipe's config comes with --config


def test_each_run_has_its_schema():
    assert RUNS["grpo"][1] is run_grpo and RUNS["sft"][1] is run_sft
    assert {name: schema.__name__ for name, (schema, _) in RUNS.items()} == {"grpo": "GRPOConfig", "sft": "SFTConfig"}

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


@pytest.mark.parametrize("name", ["grpo_logitavg_8b", "grpo_logitavg_70b", "grpo_kl_8b", "grpo_kl_70b"])
def test_shipped_cluster_configs_load_and_validate(name):
    """The 8B/70B configs and their KL baselines: same budget, only ref_weight and beta differ."""
    from pathlib import Path

    from nemo_logitavg.config import GRPOConfig

    root = Path(__file__).resolve().parent.parent / "configs"
    cfg = load_config(GRPOConfig, root / f"{name}.yaml", ["model.policy=p"]).validate()
    assert cfg.cluster is not None and cfg.model.dtype == "bfloat16"
    twin = load_config(GRPOConfig, root / f"{name.replace('kl', 'logitavg')}.yaml", ["model.policy=p"])
    if "kl" in name:
        assert (cfg.algorithm.ref_weight, cfg.algorithm.beta) == (0.0, 0.05)
        cfg.algorithm.ref_weight, cfg.algorithm.beta, cfg.run.dir = twin.algorithm.ref_weight, 0.0, twin.run.dir
        assert cfg == twin
    with pytest.raises(ValueError, match="required key.*model.policy"):
        load_config(GRPOConfig, root / f"{name}.yaml")


@pytest.mark.parametrize(
    "override,message",
    [
        ("cluster.rollout_tp=3", "cluster.rollout_tp must divide cluster.gpus_per_node"),
        ("cluster.trainer_nodes=0", "cluster.trainer_nodes must be >= 1"),
        ("cluster.max_context=3072", "cluster.max_context must exceed rollout.max_tokens"),
        ("model.pipeline_parallel=3", "64 trainer GPUs must be a multiple of"),
        # the shipped config uses a token budget (which replaces train.micro_batch_size): one sequence per
        # mini-batch does not split over DP=2, and a budget below a whole context is refused
        ("algorithm.mini_batches=512", "must split over data parallel"),
        ("train.max_tokens_per_micro_batch=3500", "train.max_tokens_per_micro_batch must hold a sequence"),
    ],
)
def test_cluster_section_errors_name_the_key(override, message):
    from pathlib import Path

    from nemo_logitavg.config import GRPOConfig

    path = Path(__file__).resolve().parent.parent / "configs" / "grpo_logitavg_70b.yaml"
    with pytest.raises(ValueError, match=message):
        load_config(GRPOConfig, path, ["model.policy=p", override]).validate()


def test_shipped_sweep_config():
    from pathlib import Path

    from nemo_logitavg.config import SweepConfig

    root = Path(__file__).resolve().parent.parent
    sweep = load_config(SweepConfig, root / "configs" / "sweep_ref_weight_8b.yaml").validate()
    assert len(sweep) == 12  # launcher/sweep_ref_weight.sh's --array=0-11
    points = {(run.algorithm.ref_weight, run.run.seed, run.run.dir) for run in
              (sweep.load_run(i, ["model.policy=p"], root=root) for i in range(len(sweep)))}  # fmt: skip
    assert len(points) == 12 and (0.25, 3, "runs/sweep_ref_weight_8b/a0.25_seed3") in points
    base = load_config(SweepConfig, root / "configs" / "sweep_ref_weight_8b.yaml").load_run(0, ["model.policy=p"], root)
    assert base.algorithm.group_size == 8 and base.algorithm.beta == 0.0  # held fixed across the grid
    with pytest.raises(ValueError, match="outside the grid of 12"):
        sweep.run_overrides(12)


def test_wait_timeout_is_derived_from_the_rollout_worst_case():
    """run.wait_timeout unset: attempts x (request timeout + the client's 30 s largest backoff) + grading (every
    answer at data.reward_timeout, after the grader's 120 s start-up) + push_timeout (docs/design.md §7b)."""
    from pathlib import Path

    from nemo_logitavg.config import GRPOConfig

    path = Path(__file__).resolve().parent.parent / "configs" / "grpo_logitavg_tiny.yaml"
    overrides = ["model.policy=p", "data.train=t", "rollout.timeout=100", "rollout.attempts=3",
                 "rollout.push_timeout=50", "data.reward_timeout=2", "rollout.prompts_per_step=4",
                 "algorithm.group_size=4", "train.micro_batch_size=2"]  # fmt: skip
    cfg = load_config(GRPOConfig, path, overrides).validate()
    expected = 3 * (100 + 30) + (120 + 16 * 2) + 50
    assert cfg.wait_bound() == expected and cfg.wait_timeout() == expected


def test_wait_timeout_that_could_expire_first_is_refused():
    from pathlib import Path

    from nemo_logitavg.config import GRPOConfig

    path = Path(__file__).resolve().parent.parent / "configs" / "grpo_logitavg_tiny.yaml"
    base = ["model.policy=p", "data.train=t", "rollout.timeout=600", "rollout.attempts=8"]
    bound = load_config(GRPOConfig, path, base).validate().wait_bound()
    refused = r"run\.wait_timeout = 3600 s .*rollout\.timeout \(600 s\) x rollout\.attempts \(8\)"
    with pytest.raises(ValueError, match=refused):
        load_config(GRPOConfig, path, [*base, "run.wait_timeout=3600"]).validate()
    with pytest.raises(ValueError, match=r"run\.wait_timeout must be > 0"):
        load_config(GRPOConfig, path, [*base, "run.wait_timeout=0"]).validate()
    with pytest.raises(ValueError, match=r"rollout\.attempts must be >= 1"):
        load_config(GRPOConfig, path, [*base, "rollout.attempts=0"]).validate()
    # At the bound (and above it) the wait cannot expire first: accepted and used as given.
    cfg = load_config(GRPOConfig, path, [*base, f"run.wait_timeout={bound}"]).validate()
    assert cfg.wait_timeout() == bound


@pytest.mark.parametrize(
    "name", ["grpo_logitavg_tiny.yaml", "grpo_logitavg_8b.yaml", "grpo_kl_8b.yaml", "grpo_logitavg_70b.yaml",
             "grpo_kl_70b.yaml"],
)  # fmt: skip
def test_shipped_configs_wait_longer_than_the_rollout_worst_case(name):
    from pathlib import Path

    from nemo_logitavg.config import GRPOConfig

    path = Path(__file__).resolve().parent.parent / "configs" / name
    cfg = load_config(GRPOConfig, path, ["model.policy=p", "data.train=t"]).validate()
    r = cfg.rollout
    assert cfg.wait_timeout() >= r.attempts * r.timeout + r.push_timeout


def test_batch_split_check_names_every_setting():
    from nemo_logitavg.config import check_batch_split

    check_batch_split("a step", 16, [("algorithm.mini_batches", 2), ("train.micro_batch_size", 4)])
    check_batch_split("a step", 6, [])
    with pytest.raises(ValueError, match=r"^a step = 12 sequences must split over algorithm\.mini_batches \(2\) x "
                                         r"train\.micro_batch_size \(4\)$"):  # fmt: skip
        check_batch_split("a step", 12, [("algorithm.mini_batches", 2), ("train.micro_batch_size", 4)])
    with pytest.raises(ValueError, match=r"train\.micro_batch_size \(None\)"):  # not set: never splits
        check_batch_split("a mini-batch", 8, [("data parallel", 2), ("train.micro_batch_size", None)])


def test_config_bounds_are_the_clients_and_the_graders():
    """The rollout and grading defaults of the config are the client's and the grader's own defaults (one named
    constant each), and the derived wait uses the client's largest backoff and the grader's start-up bound."""
    import inspect

    from nemo_logitavg.config import DataSection, RolloutSection
    from nemo_logitavg.rewards.math_answer import MathGrader, score_math
    from nemo_logitavg.rollout.client import RolloutClient

    client = inspect.signature(RolloutClient).parameters
    grader = inspect.signature(MathGrader).parameters
    assert (RolloutSection().timeout, RolloutSection().attempts) == (client["timeout"].default,
                                                                     client["max_attempts"].default) == (600.0, 8)
    assert client["max_backoff"].default == 30.0 and grader["startup_timeout"].default == 120.0
    assert DataSection.reward_timeout == grader["timeout"].default == 5.0
    assert inspect.signature(score_math).parameters["timeout"].default == 5.0


def test_redact_secrets_hides_the_rollout_token_only():
    from nemo_logitavg.config import redact_secrets

    cfg = {"rollout": {"token": "hunter2", "urls": ["http://a"]}, "run": {"seed": 1}}
    assert redact_secrets(cfg) == {"rollout": {"token": "<redacted>", "urls": ["http://a"]}, "run": {"seed": 1}}
    assert cfg["rollout"]["token"] == "hunter2"  # a copy: the caller's config is untouched
    assert redact_secrets({"rollout": {"token": "${oc.env:TOKEN}"}})["rollout"]["token"] == "${oc.env:TOKEN}"
    assert redact_secrets({"rollout": {"token": None}, "run": {}}) == {"rollout": {"token": None}, "run": {}}
    assert redact_secrets({"run": {"seed": 1}}) == {"run": {"seed": 1}}


MOVED = "moved to train.{key} (it sizes the update's micro-batches, not the rollouts)"


@pytest.mark.parametrize("key,value", [("micro_batch_size", 8), ("max_tokens_per_micro_batch", 4096)])
def test_moved_rollout_keys_are_refused_with_their_new_place(tmp_path, key, value):
    """rollout.micro_batch_size and rollout.max_tokens_per_micro_batch size the update: they live in ``train``."""
    import re
    from pathlib import Path

    from nemo_logitavg.config import GRPOConfig, config_as_dict

    base = ["model.policy=p", "data.train=t"]
    tiny = Path(__file__).resolve().parent.parent / "configs" / "grpo_logitavg_tiny.yaml"
    moved = re.escape(f"rollout.{key} " + MOVED.format(key=key))
    with pytest.raises(ValueError, match=rf"^command-line override: {moved}$"):
        load_config(GRPOConfig, tiny, [*base, f"rollout.{key}={value}"])
    old = tmp_path / "old.yaml"
    old.write_text(f"model:\n  policy: p\ndata:\n  train: t\nrollout:\n  max_tokens: 16\n  {key}: {value}\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(old))}: {moved}$"):
        load_config(GRPOConfig, old)
    with pytest.raises(ValueError, match=rf"{moved}$"):
        config_as_dict(GRPOConfig, old)
    # the new place takes the same value
    cfg = load_config(GRPOConfig, tiny, [*base, f"train.{key}={value}"]).validate()
    assert getattr(cfg.train, key) == value and not hasattr(cfg.rollout, key)


def test_train_section_keeps_the_defaults():
    from nemo_logitavg.config import GRPOConfig

    cfg = GRPOConfig()
    assert (cfg.train.micro_batch_size, cfg.train.max_tokens_per_micro_batch) == (4, None)

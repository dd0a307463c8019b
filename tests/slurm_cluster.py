"""A real one-node Slurm cluster on localhost (Debian's slurm-wlm + munge), for the launcher tests.

Runs as root, everything under one temporary directory with its own munge socket and ports, so it neither
needs nor touches a system-wide Slurm. docs/design.md §5 has the measured configuration.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REQUIRED = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def missing_requirements() -> str | None:
    """Why a local cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "the local Slurm cluster runs as root"
    absent = [tool for tool in REQUIRED if shutil.which(tool) is None]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install slurm-wlm munge)"
    if not Path("/etc/munge/munge.key").exists():
        return "no /etc/munge/munge.key"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalSlurm:
    """``LocalSlurm()``: one real node (slurmctld + slurmd) that runs jobs. ``LocalSlurm(nodes=16, gpus=8)``: a
    controller that declares H100-like nodes (``Gres=gpu:8``, all at 127.0.0.1, no slurmd: marked IDLE) for
    ``sbatch --test-only``, which the controller answers alone."""

    def __init__(self, cpus: int | None = None, nodes: int = 0, gpus: int = 8, max_time: str = "2-00:00:00") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="nla-slurm-", dir="/tmp"))  # short: unix socket path limit
        self.cpus = cpus or os.cpu_count() or 1
        self.nodes, self.gpus, self.max_time = nodes, gpus, max_time
        self.env = dict(os.environ, SLURM_CONF=str(self.dir / "slurm.conf"))

    def _node_lines(self) -> str:
        if not self.nodes:
            return (f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=8000 State=UNKNOWN\n"
                    "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n")  # fmt: skip
        names = f"gpu[01-{self.nodes:02d}]"
        (self.dir / "gres.conf").write_text(f"NodeName={names} Name=gpu Count={self.gpus}\n")
        return (f"GresTypes=gpu\nNodeName={names} NodeAddr=127.0.0.1 CPUs=64 Boards=1 SocketsPerBoard=2 "
                f"CoresPerSocket=32 ThreadsPerCore=1 RealMemory=1000000 Gres=gpu:{self.gpus} State=IDLE\n"
                f"PartitionName=gpu Nodes={names} Default=YES MaxTime={self.max_time} State=UP\n")  # fmt: skip

    def __enter__(self) -> LocalSlurm:
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir()
        (d / "munge").chmod(0o755)
        self.socket = d / "munge" / "munge.socket"
        subprocess.run(
            ["munged", f"--socket={self.socket}", f"--pid-file={d}/munge/munged.pid",
             f"--seed-file={d}/munge/seed", f"--log-file={d}/munge/munged.log", "--force"],
            check=True,
        )  # fmt: skip
        (d / "slurm.conf").write_text(
            f"""ClusterName=nla
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/log/jobcomp.txt
ReturnToService=2
MpiDefault=none
{self._node_lines()}"""
        )
        conf = str(d / "slurm.conf")
        subprocess.run(["slurmctld", "-f", conf], check=True, env=self.env)
        if not self.nodes:
            subprocess.run(["slurmd", "-f", conf], check=True, env=self.env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env).stdout
            if out.strip() == "idle":
                return self
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"local Slurm did not come up; logs in {d}/log")

    def sbatch(self, *args: str, cwd: str | Path) -> int:
        out = subprocess.run(
            ["sbatch", "--parsable", *args], capture_output=True, text=True, env=self.env, cwd=cwd, check=True
        ).stdout
        return int(out.strip().split(";")[0])

    def test_only(self, *args: str, cwd: str | Path) -> subprocess.CompletedProcess:
        """``sbatch --test-only ARGS``: the controller's answer (it prints it on stderr), nothing submitted."""
        return subprocess.run(["sbatch", "--test-only", *args], capture_output=True, text=True, env=self.env, cwd=cwd)

    def job_state(self, job_id: int) -> dict[str, str]:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, env=self.env
        ).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job_id: int, timeout: float = 600) -> dict[str, str]:
        # `sbatch --wait` polls slowly; scontrol answers at once.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id).get('JobState')} after {timeout} s")

    def __exit__(self, *_exc: object) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            path = self.dir / pid_file
            if path.exists():
                try:
                    os.kill(int(path.read_text().split()[0]), 15)
                except (ProcessLookupError, ValueError):
                    pass
        subprocess.run(["munged", f"--socket={self.socket}", "--stop"], capture_output=True)
        time.sleep(0.5)
        shutil.rmtree(self.dir, ignore_errors=True)

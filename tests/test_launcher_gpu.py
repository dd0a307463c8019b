"""The GPU launchers' shell logic without a GPU cluster: the batch script runs under bash with Slurm's variables
set and stub `srun`, `scontrol`, `curl` and `scancel` on PATH that record what they are asked. The planner runs
for real (the stub srun executes it), so its refusals stop the job as they would on a cluster."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SRUN = """#!/bin/bash
# Record the step; run the planner; server steps also record the NLA_* environment they get and stay alive until
# killed; the trainer step succeeds.
args=("$@")
while [[ "${args[0]}" == -* ]]; do args=("${args[@]:1}"); done
case "$*" in
  *recipes/plan.py*) printf '%s\\n' "$*" >> "$STUB_LOG"; exec "${args[@]}" ;;
  *nla_serve_node*) printf '%s | %s\\n' "$*" "$(env | grep '^NLA_' | sort | tr '\\n' ' ')" >> "$STUB_LOG"
                    exec sleep 60 ;;
  *) printf '%s\\n' "$*" >> "$STUB_LOG" ;;
esac
"""
# /health answers once the server step of the URL's node has started (no race with the background sruns).
CURL = """#!/bin/bash
host="${*: -1}"; host="${host#http://}"; host="${host%%:*}"
for _ in $(seq 100); do grep -q -- "--nodelist=$host " "$STUB_LOG" && exit 0; sleep 0.1; done
exit 7
"""
SCONTROL = """#!/bin/bash
printf 'scontrol %s\\n' "$*" >> "$STUB_LOG"
if [[ "$1 $2" == "show hostnames" ]]; then for i in $(seq 1 "$STUB_NODES"); do printf 'gpu%02d\\n' "$i"; done; fi
"""


def _stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("curl", CURL),
                       ("scancel", "#!/bin/bash\nexit 0\n")):  # fmt: skip
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_batch(tmp_path: Path, script: str, nodes: int, *args: str, **env: str) -> tuple[int, str, list[str]]:
    """Run launcher/SCRIPT as Slurm would on a job of ``nodes`` nodes; (exit code, output, srun/scontrol calls)."""
    log = tmp_path / "calls.log"
    log.write_text("")
    full_env = dict(
        os.environ, PATH=f"{_stubs(tmp_path)}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="4242", SLURM_JOB_NAME="test", SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_JOB_NODELIST=f"gpu[01-{nodes:02d}]", SLURM_CPUS_ON_NODE="64", STUB_LOG=str(log),
        STUB_NODES=str(nodes), NLA_LOG_DIR=str(tmp_path / "logs"), **{"NLA_CONTAINER_IMAGE": "none", **env},
    )  # fmt: skip
    out = subprocess.run(["bash", str(ROOT / "launcher" / script), *args], capture_output=True, text=True,
                         env=full_env, cwd=ROOT, timeout=300)  # fmt: skip
    return out.returncode, out.stdout + out.stderr, log.read_text().splitlines()


def test_70b_job_splits_nodes_starts_servers_and_points_the_trainer_at_them(tmp_path):
    rc, out, calls = run_batch(tmp_path, "grpo_logitavg_70b.sh", 12, "model.policy=llama3-70b",
                               NLA_CONTAINER_IMAGE="nvcr.io/example/image:1")  # fmt: skip
    assert rc == 0, out
    assert "| optimizer state |" in out and "fits" in out  # the plan is in the job log
    steps = [c for c in calls if not c.startswith("scontrol")]
    assert "recipes/plan.py --shell --config configs/grpo_logitavg_70b.yaml model.policy=llama3-70b" in steps[0]
    servers = [c for c in steps if "nla_serve_node" in c]
    assert sorted(c.split("--nodelist=")[1].split()[0] for c in servers) == ["gpu09", "gpu10", "gpu11", "gpu12"]
    assert all("--container-image=nvcr.io/example/image:1" in c for c in servers)
    exported = ["NLA_POLICY=llama3-70b", "NLA_REFERENCE=llama3-70b", "NLA_REF_WEIGHT=0.5", "NLA_ROLLOUT_TP=8",
                "NLA_SERVERS_PER_NODE=1", "NLA_ROLLOUT_PORT=8000", "NLA_ROLLOUT_MAX_SEQS=128",
                "NLA_ROLLOUT_ENGINE=vllm", "NLA_MAX_CONTEXT=4096", "NLA_ROLLOUT_GPU_MEMORY_GIB=74",
                "NLA_ROLLOUT_BATCHED_TOKENS=8192", "NLA_DTYPE=bfloat16"]  # fmt: skip
    for c in servers:  # what nla_serve_node reads must reach the step's environment
        assert all(item in c.split(" | ")[1] for item in exported), c
    trainer = shlex.split(steps[-1])
    assert "--nodes=8" in trainer and "--ntasks-per-node=8" in trainer and "--cpus-per-task=8" in trainer
    assert f"--nodelist={','.join(f'gpu{i:02d}' for i in range(1, 9))}" in trainer
    assert trainer[trainer.index("python"):][:4] == ["python", "recipes/grpo.py", "--config",
                                                     "configs/grpo_logitavg_70b.yaml"]  # fmt: skip
    urls = ",".join(f"http://gpu{i:02d}:8000" for i in range(9, 13))
    assert f"rollout.urls=[{urls}]" in trainer
    assert "rollout.token=${oc.env:NEMO_LOGITAVG_ROLLOUT_TOKEN}" in trainer  # the secret is not on the line
    assert "rendezvous gpu01:" in out and "trainers: gpu01" in out


def test_sweep_task_runs_its_grid_point(tmp_path):
    rc, out, calls = run_batch(tmp_path, "sweep_ref_weight.sh", 2, "model.policy=llama3-8b",
                               SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_TASK_COUNT="12")  # fmt: skip
    assert rc == 0, out
    trainer = shlex.split(calls[-1])
    assert "configs/grpo_logitavg_8b.yaml" in trainer
    for item in ("algorithm.ref_weight=0.25", "run.seed=3", "run.dir=runs/sweep_ref_weight_8b/a0.25_seed3",
                 "model.policy=llama3-8b"):  # fmt: skip
        assert item in trainer
    servers = [c for c in calls if "nla_serve_node" in c]
    assert len(servers) == 1 and "--nodelist=gpu02" in servers[0]
    assert "warning" not in out


@pytest.mark.parametrize(
    "nodes,override,message",
    [
        (12, "cluster.rollout_max_seqs=256", "largest: KV cache"),  # the planner refuses the layout
        (12, "model.tensor_parallel=16", "does not divide num_key_value_heads=8"),  # ... or the model
        (12, "model.pipeline_parallel=3", "64 trainer GPUs must be a multiple of"),  # ... or the config check
        (2, "algorithm.ref_weight=0.5", "needs 8 trainer + 4 rollout nodes = 12, this job has 2"),
    ],
)
def test_refusals_stop_the_job_before_anything_starts(tmp_path, nodes, override, message):
    rc, out, calls = run_batch(tmp_path, "grpo_logitavg_70b.sh", nodes, "model.policy=llama3-70b", override)
    assert rc != 0 and message in out, out
    assert not [c for c in calls if "nla_serve_node" in c or "recipes/grpo.py" in c]


def test_missing_container_image_is_explained(tmp_path):
    rc, out, _ = run_batch(tmp_path, "grpo_logitavg_8b.sh", 2, "model.policy=llama3-8b",
                           NLA_CONTAINER_IMAGE=str(tmp_path / "absent.sqsh"))  # fmt: skip
    assert rc != 0 and "no container image" in out and "NLA_CONTAINER_IMAGE=none" in out


def _serve_node(tmp_path: Path, **overrides: str) -> list[str]:
    """Run nla_serve_node (the step on a rollout node: 8 GPUs, TP2, four servers) with a stub python that records
    each server's CUDA_VISIBLE_DEVICES, its ignored signals and its command line; the sorted records."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(
        '#!/bin/bash\necho "$CUDA_VISIBLE_DEVICES|$(awk \'/SigIgn/ {print $2}\' /proc/$$/status)|$*" >> "$STUB_LOG"\n'
        "sleep 1\n"
    )
    (bin_dir / "python").chmod(0o755)
    log = tmp_path / "servers.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log),
               CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7", NLA_GPUS_PER_NODE="8", NLA_SERVERS_PER_NODE="4",
               NLA_ROLLOUT_TP="2", NLA_ROLLOUT_PORT="8000",
               NLA_ROLLOUT_MAX_SEQS="96", NLA_POLICY="/m/policy", NLA_REFERENCE="", NLA_REF_WEIGHT="0.0",
               NLA_ROLLOUT_ENGINE="vllm", NLA_MAX_CONTEXT="4096", NLA_ROLLOUT_GPU_MEMORY_GIB="74",
               NLA_ROLLOUT_BATCHED_TOKENS="8192", NLA_DTYPE="bfloat16",
               NLA_LOG_DIR=str(tmp_path), SLURMD_NODENAME="gpu02")  # fmt: skip
    env.pop("NLA_ROLLOUT_DEVICE", None)
    env.update(overrides)
    subprocess.run(["bash", "-c", 'source launcher/common.sh && nla_serve_node "$@"', "nla_serve_node", "--max-n",
                    "16"], env=env, cwd=ROOT, timeout=60, check=True)  # fmt: skip
    return sorted(log.read_text().splitlines())


def test_rollout_node_gives_each_server_its_gpus_and_port(tmp_path):
    """nla_serve_node (the step on a rollout node): 8 GPUs, TP2 -> four servers on GPU pairs and ports 8000-8003,
    each with USR1 ignored (preemption is the trainer's) and the reference only when ref_weight > 0."""
    lines = _serve_node(tmp_path)
    assert [line.split("|")[0] for line in lines] == ["0,1", "2,3", "4,5", "6,7"]
    for k, line in enumerate(lines):
        devices, ignored, args = line.split("|")
        assert int(ignored, 16) & (1 << 9), "SIGUSR1 (10) must be ignored"
        yaml_path = tmp_path / "server-gpu02.yaml"
        # the trainer's dtype, then the extra flags (a --dtype among them would win)
        assert (f"--port {8000 + k} --max-batch-size 96 --engine vllm --dtype bfloat16 --config {yaml_path} "
                "--max-n 16") in args  # fmt: skip
        assert "--reference" not in args and "--ref-weight 0.0" in args
        assert "--device" not in args  # vLLM places its own workers
    # vLLM's settings: its GPUs, the planned context and batch, the planner's memory budget of a GPU
    assert yaml_path.read_text() == ("vllm:\n  tensor_parallel_size: 2\n  max_model_len: 4096\n"
                                     "  max_num_batched_tokens: 8192\n  gpu_memory_gib: 74\n")  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("server-gpu02-*.log")) == [f"server-gpu02-{k}.log" for k in range(4)]


@pytest.mark.parametrize(
    "overrides,device",
    [
        ({}, "cuda"),  # a rollout node is a GPU node: each torch server on the first of its own GPUs
        ({"NLA_ROLLOUT_DEVICE": "cuda:1"}, "cuda:1"),
        ({"NLA_ROLLOUT_DEVICE": "cpu"}, None),  # serving from the host: the server's own default, no flag
    ],
)
def test_torch_engine_servers_get_the_gpu_device(tmp_path, overrides, device):
    lines = _serve_node(tmp_path, NLA_ROLLOUT_ENGINE="torch", **overrides)
    assert [line.split("|")[0] for line in lines] == ["0,1", "2,3", "4,5", "6,7"]
    for line in lines:
        args = line.split("|")[2].split()
        assert "--config" not in args  # the vLLM settings are vLLM's
        if device is None:
            assert "--device" not in args, line
        else:  # once, after the dtype and before the extra flags (a --device among them would win)
            assert args.count("--device") == 1 and args[args.index("--device") + 1] == device, line
            assert args.index("--dtype") < args.index("--device") < args.index("--max-n"), line


def test_evaluate_serves_each_model_with_vllm_over_the_node(tmp_path):
    rc, out, calls = run_batch(tmp_path, "evaluate.sh", 1, "--data", "d.jsonl", "--model", "sft=S", "--out", "r")
    assert rc == 0, out
    (call,) = [c for c in calls if not c.startswith("scontrol")]
    config = tmp_path / "logs" / "server.yaml"
    assert f"recipes/evaluate.py --server-arg=--engine --server-arg=vllm --server-arg=--config={config}" in call
    assert call.endswith("--data d.jsonl --model sft=S --out r")
    assert config.read_text() == "vllm:\n  tensor_parallel_size: 8\n"


def test_stray_planner_output_is_shown_not_evaluated(tmp_path):
    """Whatever else reaches the planner's stdout (here a sitecustomize printing at start-up, as a library or
    a container hook may) is never run by the batch shell: only the planner's marked assignments are."""
    hook = tmp_path / "hook"
    hook.mkdir()
    ran = tmp_path / "stray-line-ran"
    (hook / "sitecustomize.py").write_text(f"print('touch {ran}')\nprint('export NLA_ROLLOUT_PORT=1')\n")
    rc, out, calls = run_batch(tmp_path, "grpo_logitavg_8b.sh", 2, "model.policy=llama3-8b", PYTHONPATH=str(hook))
    assert rc == 0, out
    assert not ran.exists(), "a stray stdout line of the planner was evaluated by the batch shell"
    assert f"[launcher] ignored planner output: touch {ran}" in out
    assert any("rollout.urls=[http://gpu02:8000," in c for c in calls)  # the planned port, not the stray 1

"""recipes/grpo.py end to end on CPU: TP=2 actor, a real rollout server, math-verify rewards, checkpoints,
and a run killed mid-way that resumes to the same metrics as a run that was not killed (bit for bit)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny_models import make_llama_with_tokenizer

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
TIMING_KEYS = ("time/", "throughput/")


def write_config(tmp: Path, run_dir: Path, policy: str, reference: str, steps: int = 4, **algorithm) -> Path:
    prompts = tmp / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a in range(3) for b in range(3))
    )
    alg = {"ref_weight": 0.5, "group_size": 4, "beta": 0.0, **algorithm}
    config = tmp / f"grpo_{run_dir.name}.yaml"
    config.write_text(
        f"""model:
  policy: {policy}
  reference: {reference}
  tensor_parallel: 2
algorithm:
{"".join(f"  {k}: {v}" + chr(10) for k, v in alg.items())}rollout:
  prompts_per_step: 2
  max_tokens: 6
train:
  micro_batch_size: 4
data:
  train: {prompts}
  test: {prompts}
optim:
  lr: 0.01
run:
  dir: {run_dir}
  steps: {steps}
  checkpoint_every: 1
  eval_every: 2
  seed: 7
"""
    )
    return config


def launch(config: Path, log: Path) -> subprocess.Popen:
    with socket.socket() as sock:  # torchrun's static rendezvous needs a real port (0 hangs)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port),
           str(ROOT / "recipes" / "grpo.py"), "--config", str(config)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def metrics_by_step(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = {k: v for k, v in record.items() if not k.startswith(TIMING_KEYS)}
    return out  # a step redone after a resume keeps its last record


def run_to_end(config: Path, log: Path, timeout: float = 400) -> None:
    proc = launch(config, log)
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-4000:]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_llama_with_tokenizer(str(root / "policy"), seed=1), make_llama_with_tokenizer(str(root / "ref"), 2)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every descendant at once: torchrun starts its workers in sessions of their own, so
    killing its process group alone leaves the trainer ranks running."""
    import psutil

    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(tree, timeout=30)


def test_logit_averaging_grpo_runs(models, tmp_path):
    run_dir = tmp_path / "run"
    run_to_end(write_config(tmp_path, run_dir, *models), tmp_path / "log.txt")
    metrics = metrics_by_step(run_dir)
    assert sorted(metrics) == [1, 2, 3, 4]
    for record in metrics.values():
        for key in ("reward/mean", "response/length", "mismatch/mean_abs", "mismatch/max_abs", "grad_norm",
                    "pi_mix_entropy", "clip_fraction", "loss"):  # fmt: skip
            assert key in record, key
        # The trainer's recomputed log pi_mix equals the server's (same weights, same pi_mix).
        assert record["mismatch/max_abs"] < 1e-4
    assert "eval/accuracy" in metrics[2] and "eval/accuracy" in metrics[4] and "eval/accuracy" not in metrics[3]
    assert metrics[4]["eval/problems"] == 9
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "4"
    assert any((run_dir / "tensorboard").iterdir())
    # Nothing is written per step any more (the push is a collective); the final save writes policy_final/.
    assert not (run_dir / "policy_sync").exists()
    final = run_dir / "policy_final"
    assert (final / "config.json").is_file()

    # Release: the training checkpoint of step 4 exports to the same weights as the final policy.
    from nemo_logitavg.models.conversion.hf_files import read_hf_state

    out = tmp_path / "exported"
    subprocess.run([sys.executable, str(ROOT / "recipes" / "convert_mcore_to_hf.py"), "--ckpt",
                    str(run_dir / "checkpoints"), "--out", str(out)], check=True, timeout=300,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True)  # fmt: skip
    exported, final_state = read_hf_state(out), read_hf_state(final)
    assert set(exported) == set(final_state) and all(exported[k].equal(final_state[k]) for k in final_state)


def test_killed_run_resumes_to_identical_metrics(models, tmp_path):
    # The KL-GRPO baseline (ref_weight 0, beta > 0) with policy != reference: the KL term moves the policy at
    # every step even when all rewards in a group are equal, so the comparison has teeth.
    baseline = {"ref_weight": 0.0, "beta": 0.5}
    straight = tmp_path / "straight"
    run_to_end(write_config(tmp_path, straight, *models, steps=5, **baseline), tmp_path / "straight.txt")
    expected = metrics_by_step(straight)
    assert expected[1]["grad_norm"] > 0 and expected[5]["kl"] != expected[1]["kl"]

    killed = tmp_path / "killed"
    config = write_config(tmp_path, killed, *models, steps=5, **baseline)
    proc = launch(config, tmp_path / "killed.txt")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = (killed / "metrics.jsonl").read_text().count("\n") if (killed / "metrics.jsonl").exists() else 0
        if done >= 2:
            break
        assert proc.poll() is None, (tmp_path / "killed.txt").read_text()[-4000:]
        time.sleep(0.2)
    kill_tree(proc)  # torchrun, the trainer ranks and the rollout server, mid-step
    resumed_from = int((killed / "checkpoints" / "latest").read_text())
    assert resumed_from in (1, 2)  # killed after step 2 was logged: its checkpoint may or may not be complete
    run_to_end(config, tmp_path / "resumed.txt")
    assert "resumed from" in (tmp_path / "resumed.txt").read_text()
    got = metrics_by_step(killed)
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in range(resumed_from + 1, 6):  # at least three steps after the resume
        assert got[step] == expected[step], f"step {step} differs after the resume"


def test_sigusr1_checkpoints_and_exits_then_resumes(models, tmp_path):
    """Slurm's preemption warning (SIGUSR1 to the trainer ranks): save after the current step, exit cleanly."""
    import psutil

    run_dir = tmp_path / "preempted"
    config = write_config(tmp_path, run_dir, *models, steps=6)
    log = tmp_path / "preempted.txt"
    proc = launch(config, log)
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    workers = [p for p in psutil.Process(proc.pid).children() if "grpo.py" in " ".join(p.cmdline())]
    assert len(workers) == 2
    for worker in workers:
        worker.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "received SIGUSR1" in text and "stopped at step" in text
    stopped = int((run_dir / "checkpoints" / "latest").read_text())
    assert stopped == max(metrics_by_step(run_dir)) < 6, "the checkpoint is of the last finished step"
    run_to_end(config, tmp_path / "after.txt")
    assert sorted(metrics_by_step(run_dir)) == [1, 2, 3, 4, 5, 6]


def trained_lineage(run_dir: Path) -> list[dict]:
    """The records of ``rollouts.jsonl`` that the final weights descend from: a step recorded again (after a
    resume from an earlier checkpoint) replaces what the killed run trained from that step on."""
    kept: list[dict] = []
    for line in (run_dir / "rollouts.jsonl").read_text().splitlines():
        record = json.loads(line)
        kept = [r for r in kept if r["step"] < record["step"]] + [record]
    return kept


def test_async_grpo_kill_mid_overlap_and_resume(models, tmp_path):
    """max_staleness=1: every trained completion comes from the current policy step or the one before; a run
    SIGKILLed while the producer samples the next step resumes, regenerates that step from the checkpoint's
    weights, and trains every (step, prompt, sample) exactly once."""
    run_dir = tmp_path / "async"
    config = write_config(tmp_path, run_dir, *models, steps=5, max_staleness=1)
    log = tmp_path / "async.txt"
    proc = launch(config, log)
    deadline = time.monotonic() + 300
    while not ((run_dir / "rollouts.jsonl").exists() and (run_dir / "rollouts.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    # Step 1 is trained: the producer is sampling step 2 (or 3) with the weights of step 1 (or 2) meanwhile.
    kill_tree(proc)
    before = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    resumed_from = int((run_dir / "checkpoints" / "latest").read_text())
    assert 1 <= resumed_from <= len(before)
    run_to_end(config, tmp_path / "async_resumed.txt")
    assert f"(step {resumed_from})" in (tmp_path / "async_resumed.txt").read_text()

    lineage = trained_lineage(run_dir)
    assert [r["step"] for r in lineage] == [0, 1, 2, 3, 4]
    identities = []
    for r in lineage:
        assert r["position"] == r["step"] * r["prompts"], "the data position counts trained steps only"
        assert len(r["policy_steps"]) == r["prompts"] * r["group_size"]
        assert set(r["policy_steps"]) <= {r["step"], r["step"] - 1}, r
        identities += [(r["step"], r["position"] + i // r["group_size"], i % r["group_size"])
                       for i in range(len(r["policy_steps"]))]  # fmt: skip
    assert len(identities) == len(set(identities)) == 5 * 2 * 4, "a completion trained twice or lost"
    # The overlap happened: steps trained on rollouts of the previous policy (all but the first of each run).
    assert any(s == r["step"] - 1 for r in lineage for s in r["policy_steps"])
    # After the resume the in-flight step was sampled again, by the checkpoint's weights: staleness 0.
    first = next(r for r in lineage if r["step"] == resumed_from)
    assert set(first["policy_steps"]) == {resumed_from}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in metrics:
        for key in ("staleness/0", "staleness/1", "is_truncated_fraction", "is_weight_mean", "async/dropped_stale",
                    "time/rollout_wait_s", "time/weights_wait_s", "mismatch/max_abs"):  # fmt: skip
            assert key in record, key
        assert record["staleness/0"] + record["staleness/1"] == pytest.approx(1.0)
        assert record["async/dropped_stale"] == 0 and record["mismatch/max_abs"] < 1e-4

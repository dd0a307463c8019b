"""Distributed checkpoints of the actor: resharding, exact resume, atomicity under SIGKILL, clear errors."""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import signal
import time
import warnings

import numpy as np
import pytest
import torch

from nemo_logitavg.checkpointing import (
    LATEST_FILE,
    MANIFEST_FILE,
    CheckpointError,
    CheckpointNotFoundError,
    find_checkpoint,
    latest_step,
    step_dir_name,
)
from tests.distributed import _free_port, run_distributed
from tests.test_actor import micro_batches, weighted_loss
from tests.tiny_models import make_hf_llama

LR, WARMUP = 1e-2, 3  # a warm-up makes the LR schedule part of what must be restored
SAVED_STEP = 2


def _actor(dirs, tp: int, pp: int, load_hf: bool = True):
    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
    from nemo_logitavg.parallel import init_parallel

    init_parallel(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    cfg = ActorConfig(lr=LR, lr_warmup_steps=WARMUP)
    actor = LogitAveragingActor(LlamaConfig.from_hf(dirs[0]), LlamaConfig.from_hf(dirs[1]), cfg)
    if load_hf:
        actor.load_hf(*dirs)
    return actor


def _train_step(actor) -> None:
    actor.forward_backward(micro_batches(), weighted_loss)
    applied, _ = actor.optimizer_step()
    assert applied


def _logprobs(actor) -> list[torch.Tensor] | None:
    results = actor.forward_backward(micro_batches(), forward_only=True)
    return [r["logprobs"] for r in results] or None  # empty on stages other than the last


def _rng_draws() -> tuple:
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(3)
    return random.random(), float(np.random.rand()), torch.rand(3), tracked


def _hf_state(actor, moments: bool = False) -> dict[str, torch.Tensor] | None:
    """The policy's weights (or Adam's moments) merged over TP/PP in Hugging Face names, on rank 0."""
    from nemo_logitavg.models.conversion.mapping import mcore_to_hf_state_dict
    from tests.distributed import gather_mcore_shards

    named = dict(actor.gpt_policy.named_parameters())
    if moments:
        state = {}
        for opt in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer]):
            state.update(opt.optimizer.state)
        tensors = {f"{k}/{n}": state[p][k] for n, p in named.items() for k in ("exp_avg", "exp_avg_sq")}
    else:
        tensors = {n: p.detach() for n, p in named.items()}
    out = {}
    for key in ("exp_avg", "exp_avg_sq") if moments else ("",):
        part = {n.split("/", 1)[-1]: t for n, t in tensors.items() if not key or n.startswith(key + "/")}

        class _State(torch.nn.Module):
            def state_dict(self, *args, part=part, **kwargs):
                return part

        grid = gather_mcore_shards(_State())
        if grid is not None:
            out.update(
                {f"{key}/{n}" if key else n: t for n, t in mcore_to_hf_state_dict(grid, actor.policy_cfg).items()}
            )
    return out or None


def _last_stage(ranks: list[dict]) -> dict:
    return next(r for r in ranks if r["logprobs"] is not None)


def _save_worker(dirs, root: str, export_dir: str) -> dict:
    import torch.distributed as dist

    from nemo_logitavg.checkpointing import save_checkpoint
    from nemo_logitavg.models.conversion.hf_files import export_hf
    from nemo_logitavg.parallel import teardown

    actor = _actor(dirs, tp=2, pp=1)
    for _ in range(SAVED_STEP):
        _train_step(actor)
    path = save_checkpoint(actor, root, SAVED_STEP, {"data_position": 96, "note": "tp2"})
    rng = _rng_draws()  # what a resumed run must draw next
    weights = _hf_state(actor)
    if dist.get_rank() == 0:  # the saved weights as a Hugging Face directory: the TP=1 comparison's source
        export_hf(weights, export_dir, actor.policy_cfg, source_dir=dirs[0])
    out = {
        "path": path,
        "rng": rng,
        "logprobs": _logprobs(actor),
        "weights": weights,
        "moments": _hf_state(actor, moments=True),
        "lr": [g["lr"] for g in actor.optimizer.param_groups],
    }
    _train_step(actor)
    out["logprobs_next"] = _logprobs(actor)
    teardown()
    return out


def _load_worker(dirs, root: str, tp: int, export_dir: str | None = None) -> dict:
    from nemo_logitavg.checkpointing import load_checkpoint
    from nemo_logitavg.parallel import teardown

    actor = _actor(dirs, tp=tp, pp=1, load_hf=False)  # random weights: everything must come from the checkpoint
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = load_checkpoint(actor, root)
    out = {
        "step": info.step,
        "extra_state": info.extra_state,
        "reference_dir": info.reference_dir,
        "rng_restored": info.rng_restored,
        "warnings": [str(w.message) for w in caught if "RNG" in str(w.message)],
        "rng": _rng_draws(),
        "lr": [g["lr"] for g in actor.optimizer.param_groups],
        "scheduler_steps": actor.scheduler.num_steps,
        "logprobs": _logprobs(actor),
        "weights": _hf_state(actor),
        "moments": _hf_state(actor, moments=True),
    }
    if export_dir is not None:  # the same weights through Hugging Face at this layout
        from nemo_logitavg.models.conversion.loading import load_hf_into_mcore

        load_hf_into_mcore(actor.gpt_policy, export_dir)
        out["logprobs_from_hf"] = _logprobs(actor)
    else:
        _train_step(actor)
        out["logprobs_next"] = _logprobs(actor)
    teardown()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two optimiser steps at TP=2, then a checkpoint of step 2, and what the run did next."""
    base = tmp_path_factory.mktemp("ckpt")
    dirs = make_hf_llama(base / "policy", seed=1), make_hf_llama(base / "reference", seed=2)
    root, export_dir = str(base / "ckpts"), str(base / "saved_policy_hf")
    ranks = run_distributed(_save_worker, 2, dirs=dirs, root=root, export_dir=export_dir)
    return {"dirs": dirs, "root": root, "export_dir": export_dir, "ranks": ranks}


@pytest.mark.slow
def test_tp2_checkpoint_loads_at_tp1(saved):
    loaded = run_distributed(
        _load_worker, 1, dirs=saved["dirs"], root=saved["root"], tp=1, export_dir=saved["export_dir"]
    )[0]
    before = _last_stage(saved["ranks"])
    assert loaded["step"] == SAVED_STEP
    assert loaded["extra_state"] == {"data_position": 96, "note": "tp2"}
    assert loaded["reference_dir"] == os.path.abspath(saved["dirs"][1])
    # Weights and Adam's moments are the saved ones, exactly, after resharding (padded vocabulary included).
    for what in ("weights", "moments"):
        assert set(loaded[what]) == set(saved["ranks"][0][what])
        for name, tensor in saved["ranks"][0][what].items():
            assert torch.equal(loaded[what][name], tensor), f"{what}: {name} differs after TP=2 -> TP=1"
    assert loaded["lr"] == before["lr"] and loaded["scheduler_steps"] == SAVED_STEP
    # Same log-probs as the saved weights loaded from Hugging Face at TP=1; TP=2's own differ by rounding only.
    for a, b, c in zip(loaded["logprobs"], loaded["logprobs_from_hf"], before["logprobs"], strict=True):
        assert (a - b).abs().max() < 1e-6
        assert (a - c).abs().max() < 1e-5
    # RNG states are per rank: not restored at another layout, and the run is told so.
    assert not loaded["rng_restored"]
    assert loaded["warnings"] and "TP=2 PP=1 DP=1" in loaded["warnings"][0]


@pytest.mark.slow
def test_same_layout_resume_is_bit_exact(saved):
    loaded = run_distributed(_load_worker, 2, dirs=saved["dirs"], root=saved["root"], tp=2)
    for before, after in zip(saved["ranks"], loaded, strict=True):
        assert after["rng_restored"] and not after["warnings"]
        for a, b in zip(before["rng"], after["rng"], strict=True):  # python, numpy, torch, megatron tracker
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    before, after = _last_stage(saved["ranks"]), _last_stage(loaded)
    assert after["step"] == SAVED_STEP and after["lr"] == before["lr"]
    for a, b in zip(after["logprobs"], before["logprobs"], strict=True):
        assert torch.equal(a, b)
    # The next update equals the uninterrupted run's bit for bit: optimiser state and LR schedule restored.
    for a, b in zip(after["logprobs_next"], before["logprobs_next"], strict=True):
        assert torch.equal(a, b)


def _killed_saver(port: int, dirs, root: str, blocked_flag: str, logprobs_file: str) -> None:
    """Save step 1, then start saving step 2 and block inside dist_checkpointing.save (after the shards)."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from megatron.core.dist_checkpointing import serialization

    from nemo_logitavg.checkpointing import save_checkpoint

    actor = _actor(dirs, tp=1, pp=1)
    _train_step(actor)
    save_checkpoint(actor, root, 1, {"data_position": 8})
    torch.save(_logprobs(actor), logprobs_file)
    _train_step(actor)

    def block(*_args, **_kwargs):  # megatron's last write (metadata.json): wait here to be killed
        open(blocked_flag, "w").close()
        time.sleep(600)

    serialization.save_config = block
    save_checkpoint(actor, root, 2, {"data_position": 16})


def _resume_after_kill_worker(dirs, root: str) -> dict:
    from nemo_logitavg.checkpointing import load_checkpoint, save_checkpoint
    from nemo_logitavg.parallel import teardown

    actor = _actor(dirs, tp=1, pp=1, load_hf=False)
    info = load_checkpoint(actor, root)
    out = {"step": info.step, "extra_state": info.extra_state, "logprobs": _logprobs(actor)}
    try:
        load_checkpoint(actor, root, step=2)
    except CheckpointNotFoundError as exc:
        out["step2_error"] = str(exc)
    # The next save clears the killed save's leftovers; keep_last prunes the oldest.
    _train_step(actor)
    save_checkpoint(actor, root, 2, {"data_position": 16})
    _train_step(actor)
    save_checkpoint(actor, root, 3, {"data_position": 24}, keep_last=2)
    save_checkpoint(actor, root, 3, {"data_position": 24}, keep_last=2)  # the same step again replaces it
    teardown()
    return out


@pytest.mark.slow
def test_killed_save_leaves_previous_checkpoint_latest(tmp_path):
    import psutil

    dirs = make_hf_llama(tmp_path / "policy", seed=1), make_hf_llama(tmp_path / "reference", seed=2)
    root, flag, logprobs_file = tmp_path / "ckpts", tmp_path / "blocked", tmp_path / "logprobs_step1.pt"
    proc = multiprocessing.get_context("spawn").Process(
        target=_killed_saver, args=(_free_port(), dirs, str(root), str(flag), str(logprobs_file))
    )
    proc.start()
    try:
        deadline = time.monotonic() + 240
        while not flag.exists():
            assert proc.is_alive(), f"the saver died before blocking (exit code {proc.exitcode})"
            assert time.monotonic() < deadline, "the saver never reached the middle of its second save"
            time.sleep(0.05)
        partial = root / (step_dir_name(2) + ".tmp")
        assert any(name.endswith(".distcp") for name in os.listdir(partial)), "no shard written before the kill"
        # SIGKILL the saver and its helpers (the writer processes megatron starts), as a scheduler would.
        family = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert partial.is_dir() and not (root / step_dir_name(2)).exists()
    assert latest_step(root) == 1

    out = run_distributed(_resume_after_kill_worker, 1, dirs=dirs, root=str(root))[0]
    assert out["step"] == 1 and out["extra_state"] == {"data_position": 8}
    for a, b in zip(out["logprobs"], torch.load(logprobs_file), strict=True):
        assert torch.equal(a, b)
    assert "partial save" in out["step2_error"] and str(root / step_dir_name(2)) in out["step2_error"]
    assert sorted(os.listdir(root)) == [LATEST_FILE, step_dir_name(2), step_dir_name(3)]
    assert latest_step(root) == 3


def _complete_looking(path) -> None:
    import json

    from nemo_logitavg.checkpointing import FORMAT, FORMAT_VERSION, REQUIRED_FILES

    os.makedirs(path)
    for name in REQUIRED_FILES:
        (path / name).write_text("{}")
    step = int(path.name.split("_")[1])
    (path / MANIFEST_FILE).write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "step": step}))


def test_extra_state_is_checked_before_saving(tmp_path):
    from nemo_logitavg.checkpointing import save_checkpoint

    # megatron reads common state back with torch.load(weights_only=True): refuse what it could not read.
    with pytest.raises(ValueError, match="numpy"):
        save_checkpoint(None, tmp_path / "ckpts", 1, {"position": np.zeros(2)})
    with pytest.raises(TypeError, match="extra_state must be a dict"):
        save_checkpoint(None, tmp_path / "ckpts", 1, [1, 2])
    assert not (tmp_path / "ckpts").exists()


def test_clear_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"checkpoint root {missing} does not exist")):
        find_checkpoint(missing)

    root = tmp_path / "ckpts"
    root.mkdir()
    (root / (step_dir_name(1) + ".tmp")).mkdir()  # a killed save is not a checkpoint
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"no 'latest' file in checkpoint root {root}")):
        find_checkpoint(root)

    _complete_looking(root / step_dir_name(3))
    (root / LATEST_FILE).write_text("3\n")
    assert find_checkpoint(root) == str(root / step_dir_name(3))
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"{root / step_dir_name(7)} does not exist")):
        find_checkpoint(root, step=7)
    with pytest.raises(CheckpointNotFoundError, match="only a partial save"):
        find_checkpoint(root, step=1)

    (root / step_dir_name(3) / "metadata.json").unlink()  # partial: megatron's marker is missing
    with pytest.raises(
        CheckpointError, match=re.escape(f"{root / step_dir_name(3)} is partial or corrupted: missing metadata")
    ):
        find_checkpoint(root)

    (root / LATEST_FILE).write_text("5\n")  # latest names a directory that is gone
    with pytest.raises(
        CheckpointNotFoundError,
        match=re.escape(f"{root / step_dir_name(5)} (named by {root / LATEST_FILE}) does not exist"),
    ):
        find_checkpoint(root)
    (root / LATEST_FILE).write_text("garbage")
    with pytest.raises(CheckpointError, match="does not hold a step number"):
        find_checkpoint(root)

    _complete_looking(root / step_dir_name(4))
    (root / step_dir_name(4) / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{MANIFEST_FILE} is corrupted"):
        find_checkpoint(root, step=4)


def test_latest_falls_back_to_the_newest_complete_step(tmp_path):
    root = tmp_path / "ckpts"
    root.mkdir()
    for step in (2, 4, 5, 6):
        _complete_looking(root / step_dir_name(step))
    (root / step_dir_name(5) / "common.pt").unlink()  # partial: skipped
    # Killed between the two renames of a same-step re-save: step 6 exists only as the old save moved aside
    # (.old.tmp) and the new one (.tmp), while latest names step 6.
    step6 = root / step_dir_name(6)
    os.rename(step6, root / (step6.name + ".old.tmp"))
    _complete_looking(step6)
    os.rename(step6, root / (step6.name + ".tmp"))
    (root / LATEST_FILE).write_text("6\n")
    newest = str(root / step_dir_name(4))
    named = f"{step6} (named by {root / LATEST_FILE}) does not exist (only a partial save, .tmp, exists)"
    with pytest.warns(UserWarning, match=re.escape(f"{named}; resuming from the newest complete checkpoint, {newest}")):
        assert find_checkpoint(root) == newest
    for corrupt in (b"garbage\n", b"", b"\xff\xfe\x00"):
        (root / LATEST_FILE).write_bytes(corrupt)
        with pytest.warns(
            UserWarning, match="does not hold a step number.*newest complete checkpoint, " + re.escape(newest)
        ):
            assert find_checkpoint(root) == newest
    # An explicit step gets no fallback.
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"{step6} does not exist")):
        find_checkpoint(root, step=6)


class _Payload:
    """Unpickling this runs a shell command that creates ``marker`` (what a planted checkpoint would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _planted_payload_worker(dirs, root: str, marker: str) -> dict:
    import pickle

    from nemo_logitavg import checkpointing
    from nemo_logitavg.parallel import teardown

    actor = _actor(dirs, tp=1, pp=1)
    _train_step(actor)
    errors = {}
    # 1. An object shard (the RNG states' place) holding a pickle payload instead of tensors and plain data.
    honest = checkpointing._rng_states
    checkpointing._rng_states = lambda: {"random": _Payload(marker)}
    try:
        checkpointing.save_checkpoint(actor, root, 1)
    finally:
        checkpointing._rng_states = honest
    try:
        checkpointing.load_checkpoint(actor, root)
    except Exception as exc:  # noqa: BLE001 - the test checks which error, and that the payload did not run
        errors["object_shard"] = f"{type(exc).__name__}: {exc}"
    # 2. torch.distributed.checkpoint's index (.metadata, read with pickle.load) replaced by a payload.
    path = checkpointing.save_checkpoint(actor, root, 2)
    errors["honest_loads"] = checkpointing.load_checkpoint(actor, root).rng_restored
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(_Payload(marker), f)
    try:
        checkpointing.load_checkpoint(actor, root)
    except Exception as exc:  # noqa: BLE001
        errors["index"] = f"{type(exc).__name__}: {exc}"
    teardown()
    return errors


@pytest.mark.slow
def test_planted_pickle_payload_is_refused(tmp_path):
    dirs = make_hf_llama(tmp_path / "policy", seed=1), make_hf_llama(tmp_path / "reference", seed=2)
    root, marker = tmp_path / "ckpts", tmp_path / "payload_ran"
    errors = run_distributed(_planted_payload_worker, 1, dirs=dirs, root=str(root), marker=str(marker))[0]
    assert not marker.exists(), "the planted payload ran"
    assert errors["honest_loads"] is True
    assert (
        errors["object_shard"].startswith("CheckpointError") and str(root / step_dir_name(1)) in errors["object_shard"]
    )
    assert "posix.system" in errors["object_shard"] and "refused" in errors["object_shard"]
    assert (
        errors["index"].startswith("CheckpointError") and str(root / step_dir_name(2) / ".metadata") in errors["index"]
    )
    assert "posix.system" in errors["index"] and "refused" in errors["index"]

"""Distributed checkpoints of the actor, written atomically, loadable at another TP/PP layout.

A checkpoint holds what a killed job needs to resume exactly: the policy's weights, the optimiser state, the
LR schedule, the step, every rank's RNG states and the trainer's own ``extra_state`` (data position, ...). The
frozen reference is not copied: its directory is recorded and reloaded on resume.

    save_checkpoint(actor, "ckpts", step=12, extra_state={"epoch": 0, "position": 96})
    info = load_checkpoint(actor, "ckpts")          # the newest complete one; info.step, info.extra_state

Layout on disk (megatron-core ``dist_checkpointing``, ``torch_dist`` format, written synchronously)::

    ckpt_root/
      latest                  the step of the newest complete checkpoint, replaced atomically (os.replace)
      step_00000012/          a complete checkpoint
        checkpoint.json       our manifest (step, parallel layout, reference): written last, before the rename
        metadata.json         megatron's format marker
        common.pt             rank 0's common state: step, extra_state, LR schedule, optimiser hyper-parameters
        .metadata, *.distcp   torch.distributed.checkpoint index and shards (weights, optimiser moments, RNG)
      step_00000013.tmp/      a save in progress, or one that was killed: never loaded, removed by the next save

A save writes ``step_K.tmp``, waits for every rank (barrier), renames it to ``step_K`` and only then points
``latest`` at it, so a save killed at any moment leaves ``latest`` naming the previous complete checkpoint.
``ckpt_root`` must be one directory that every rank sees (a shared file system across nodes).

Resharding: weights and the plain (CPU) optimiser's state are stored per parameter as global tensors, so a
checkpoint loads at any TP/PP size (padded vocabulary rows included; measured on CPU: TP=2 -> TP=1 and PP=2 ->
TP=1 or TP=2, tied embeddings included). RNG states belong to ranks: they are restored only when TP, PP and DP
sizes all match, and skipped with a warning otherwise. ``load_checkpoint(..., load_optimizer=False)`` loads the
weights alone. The distributed optimiser (GPU) is saved in megatron's ``fully_reshardable`` form, as
Megatron-LM does; that path has not been run on these CPU machines.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from nemo_logitavg.models.actor import LogitAveragingActor

FORMAT = "nemo_logitavg.checkpoint"
FORMAT_VERSION = 1
LATEST_FILE = "latest"
MANIFEST_FILE = "checkpoint.json"
TMP_SUFFIX = ".tmp"
# Files every complete checkpoint holds (megatron's marker, common state, torch_dist index, our manifest).
REQUIRED_FILES = ("metadata.json", "common.pt", ".metadata", MANIFEST_FILE)
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
# How the optimiser's state is laid out: the per-parameter, fully reshardable form for the distributed
# optimiser (GPU); the plain optimiser (CPU) is per-parameter anyway and ignores these keys.
_SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the directory or file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint root, its ``latest`` file or the requested step directory does not exist."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What ``load_checkpoint`` restored, and from where."""

    step: int
    extra_state: dict
    path: str
    reference_dir: str | None
    saved_layout: dict
    optimizer_restored: bool
    rng_restored: bool
    manifest: dict = field(default_factory=dict)


def step_dir_name(step: int) -> str:
    return f"step_{int(step):08d}"


def parallel_layout() -> dict:
    """This run's TP, PP and DP sizes (and world size), the key under which RNG states are interchangeable."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return {
        "tensor_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
        "world_size": dist.get_world_size(),
    }


def complete_steps(ckpt_root: str | os.PathLike) -> list[int]:
    """Steps of the complete-looking checkpoint directories under ``ckpt_root`` (``.tmp`` ones excluded), sorted."""
    root = os.fspath(ckpt_root)
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, MANIFEST_FILE)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_step(ckpt_root: str | os.PathLike) -> int | None:
    """The step ``ckpt_root/latest`` names, or None when there is no such file.

    Raises:
        CheckpointError: when ``latest`` exists but does not hold a step number.
    """
    path = os.path.join(os.fspath(ckpt_root), LATEST_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        raise CheckpointError(f"{path} does not hold a step number (it holds {text[:40]!r})")
    return int(text)


def find_checkpoint(ckpt_root: str | os.PathLike, step: int | None = None) -> str:
    """The directory of a complete checkpoint: ``step``'s, or the one ``latest`` names when ``step`` is None.

    Pure file-system checks, the same on every rank; ``.tmp`` directories are never considered.

    Raises:
        CheckpointNotFoundError: no ``ckpt_root``, no ``latest`` in it (with step None), or no directory for
            the step. CheckpointError: a directory that lacks files a complete checkpoint has (a partial or
            corrupted checkpoint), or an unreadable manifest.
    """
    root = os.fspath(ckpt_root)
    if not os.path.isdir(root):
        raise CheckpointNotFoundError(f"checkpoint root {root} does not exist")
    if step is None:
        step = latest_step(root)
        if step is None:
            found = complete_steps(root)
            hint = f" (complete-looking step directories there: {found})" if found else ""
            raise CheckpointNotFoundError(
                f"no '{LATEST_FILE}' file in checkpoint root {root}: no checkpoint was completed there{hint}"
            )
        source = f" (named by {os.path.join(root, LATEST_FILE)})"
    else:
        source = ""
    path = os.path.join(root, step_dir_name(step))
    if not os.path.isdir(path):
        partial = " (only a partial save, .tmp, exists)" if os.path.isdir(path + TMP_SUFFIX) else ""
        raise CheckpointNotFoundError(f"checkpoint directory {path}{source} does not exist{partial}")
    missing = [name for name in REQUIRED_FILES if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise CheckpointError(f"checkpoint directory {path} is partial or corrupted: missing {', '.join(missing)}")
    manifest = read_manifest(path)
    if manifest.get("step") != step:
        raise CheckpointError(f"checkpoint directory {path} holds step {manifest.get('step')}, not {step}")
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    """A checkpoint directory's ``checkpoint.json``.

    Raises:
        CheckpointError: missing, not JSON, or another format or version.
    """
    file = os.path.join(os.fspath(path), MANIFEST_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint directory {path} is partial or corrupted: missing {MANIFEST_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is corrupted: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format {manifest.get('format')!r} v{manifest.get('version')} is not {FORMAT!r} v{FORMAT_VERSION}"
        )
    return manifest


def _check_extra_state(extra_state: dict) -> dict:
    """``extra_state`` round-tripped as megatron will read it back (``torch.load`` with ``weights_only=True``)."""
    import io

    if not isinstance(extra_state, dict):
        raise TypeError(f"extra_state must be a dict, got {type(extra_state).__name__}")
    buffer = io.BytesIO()
    torch.save(extra_state, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception as exc:
        detail = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise ValueError(
            "extra_state must hold only what torch.load(weights_only=True) reads back (dicts, lists, tuples, "
            "str, int, float, bool, None, tensors); it holds "
            + (detail.group(1) if detail else f"something else ({type(exc).__name__})")
            + " (convert numpy arrays with .tolist() or torch.from_numpy)"
        ) from None
    return dict(extra_state)


def _rng_states() -> dict:
    from megatron.core import tensor_parallel

    states = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        # Megatron's named model-parallel streams (CPU generator states under cpu_compat).
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(states["random"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])


def _rng_sharded_object(layout: dict, with_data: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    # One object per rank, addressed by its (PP, TP, DP) coordinates: only a run with the same sizes matches.
    return ShardedObject(
        "rng_state",
        _rng_states() if with_data else None,
        (layout["pipeline_parallel_size"], layout["tensor_parallel_size"], layout["data_parallel_size"]),
        (
            ps.get_pipeline_model_parallel_rank(),
            ps.get_tensor_model_parallel_rank(),
            ps.get_data_parallel_rank(),
        ),
        replica_id=0,
    )


def _sharded_state(actor: LogitAveragingActor, is_loading: bool, optimizer: bool, rng: bool, layout: dict) -> dict:
    model = actor.gpt_policy.sharded_state_dict()
    state: dict[str, Any] = {"model": model}
    if optimizer:
        state["optimizer"] = actor.optimizer.sharded_state_dict(
            model, is_loading=is_loading, metadata=dict(_SHARDING_METADATA)
        )
    if rng:
        state["rng_state"] = _rng_sharded_object(layout, with_data=not is_loading)
    return state


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}{TMP_SUFFIX}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _remove_stale(root: str) -> None:
    """Rank 0, before a save: leftovers of killed saves (``*.tmp`` directories and files)."""
    for name in os.listdir(root):
        if name.endswith(TMP_SUFFIX):
            path = os.path.join(root, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass


def _prune(root: str, keep_last: int, keep: int) -> None:
    steps = [s for s in complete_steps(root) if s != keep]
    for old in steps[: max(0, len(steps) - (keep_last - 1))]:
        shutil.rmtree(os.path.join(root, step_dir_name(old)), ignore_errors=True)


def save_checkpoint(
    actor: LogitAveragingActor,
    ckpt_root: str | os.PathLike,
    step: int,
    extra_state: dict | None = None,
    *,
    reference_dir: str | os.PathLike | None = None,
    keep_last: int | None = None,
) -> str:
    """Save the actor's policy, optimiser, LR schedule and RNG states, plus ``extra_state``, as ``step``.

    A collective: every rank calls it with the same arguments (``extra_state`` is taken from rank 0).
    Returns the checkpoint directory once ``latest`` names it on every rank.

    Args:
        actor: the actor to save (its reference is recorded by path, not saved).
        ckpt_root: directory holding the checkpoints; created when missing.
        step: the optimiser step the state belongs to (the directory is ``step_{step:08d}``).
        extra_state: the trainer's state (data position, metrics, ...): plain containers, numbers, strings and
            tensors (what ``torch.load(weights_only=True)`` reads back; checked here, before anything is written).
        reference_dir: where the reference's weights come from; by default the one ``actor.load_hf`` loaded.
        keep_last: keep only this many newest complete checkpoints (None: keep all).
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    if int(step) < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    step = int(step)
    extra_state = _check_extra_state(extra_state if extra_state is not None else {})
    root = os.path.abspath(os.fspath(ckpt_root))
    final = os.path.join(root, step_dir_name(step))
    tmp = final + TMP_SUFFIX
    rank = dist.get_rank()
    if reference_dir is None:
        reference_dir = getattr(actor, "reference_dir", None)
    reference_dir = os.path.abspath(os.fspath(reference_dir)) if reference_dir is not None else None
    layout = parallel_layout()

    if rank == 0:
        os.makedirs(root, exist_ok=True)
        _remove_stale(root)
        os.makedirs(tmp)
    dist.barrier()

    state = _sharded_state(actor, is_loading=False, optimizer=True, rng=True, layout=layout)
    scheduler = getattr(actor, "scheduler", None)
    state["common"] = {
        "step": step,
        "extra_state": extra_state,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "reference_dir": reference_dir,
        "layout": layout,
    }
    # Synchronous: every rank's shards, rank 0's common.pt and metadata.json are on disk when this returns (it
    # ends with a barrier).
    dist_checkpointing.save(state, tmp, sharded_strategy=get_default_save_sharded_strategy("torch_dist"))

    if rank == 0:
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": step,
            "layout": layout,
            "reference_dir": reference_dir,
            "has_scheduler": scheduler is not None,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_file_atomic(os.path.join(tmp, MANIFEST_FILE), json.dumps(manifest, indent=2) + "\n")
        _fsync_dir(tmp)
        if os.path.isdir(final):  # the same step saved again (e.g. on a signal right after a resume)
            trash = f"{final}.old{TMP_SUFFIX}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        _write_file_atomic(os.path.join(root, LATEST_FILE), f"{step}\n")
        if keep_last is not None:
            _prune(root, keep_last, keep=step)
    dist.barrier()
    return final


def _load_reference(actor: LogitAveragingActor, reference_dir: str, path: str) -> None:
    from nemo_logitavg.models.hf_conversion import load_hf_into_mcore, load_mcore_checkpoint

    if not os.path.isdir(reference_dir):
        raise CheckpointNotFoundError(
            f"checkpoint {path} names the reference {reference_dir}, which does not exist "
            "(pass load_reference=False and load it yourself if it moved)"
        )
    if os.path.isfile(os.path.join(reference_dir, "meta.json")):  # a convert_hf_to_mcore checkpoint
        load_mcore_checkpoint(actor.reference, reference_dir)
    else:
        load_hf_into_mcore(actor.reference, reference_dir)
    actor.reference_dir = reference_dir


def load_checkpoint(
    actor: LogitAveragingActor,
    ckpt_root: str | os.PathLike,
    step: int | None = None,
    *,
    load_optimizer: bool = True,
    load_rng: bool = True,
    load_reference: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint into ``actor`` (built for this run's layout); the newest complete one by default.

    A collective: every rank calls it. The policy weights always load, at any TP/PP; the optimiser state and
    LR schedule load unless ``load_optimizer=False`` (weights only, e.g. to start a new run from them); the
    RNG states load only when TP, PP and DP sizes equal the saving run's (a warning says when they are
    skipped); the reference is reloaded from the directory the checkpoint names unless ``load_reference=False``.

    Raises:
        CheckpointNotFoundError / CheckpointError: see ``find_checkpoint``; also a reference directory that no
            longer exists.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = find_checkpoint(ckpt_root, step)
    manifest = read_manifest(path)
    layout = parallel_layout()
    saved_layout = manifest["layout"]
    same_layout = all(saved_layout.get(k) == v for k, v in layout.items())
    restore_rng = load_rng and same_layout
    if load_rng and not same_layout:
        warnings.warn(
            f"checkpoint {path} was saved at {_describe(saved_layout)}, this run is {_describe(layout)}: "
            "RNG states are per rank and are not restored",
            stacklevel=2,
        )
    reference_dir = manifest.get("reference_dir")
    if load_reference and reference_dir is not None and actor.reference is not None:
        _load_reference(actor, reference_dir, path)

    state = _sharded_state(actor, is_loading=True, optimizer=load_optimizer, rng=restore_rng, layout=layout)
    try:
        loaded = dist_checkpointing.load(state, path, strict=StrictHandling.RAISE_UNEXPECTED)
    except Exception as exc:
        raise CheckpointError(f"could not load checkpoint {path}: {type(exc).__name__}: {exc}") from exc

    actor.gpt_policy.load_state_dict(loaded["model"], strict=True)
    common = loaded["common"]
    if load_optimizer:
        actor.optimizer.load_state_dict(loaded["optimizer"])
        scheduler = getattr(actor, "scheduler", None)
        if scheduler is not None and common.get("scheduler") is not None:
            scheduler.num_steps = 0  # load_state_dict advances from the current count
            scheduler.load_state_dict(common["scheduler"])
    elif hasattr(actor.optimizer, "reload_model_params"):
        actor.optimizer.reload_model_params()  # mixed precision: refresh the float32 main copies
    if restore_rng:
        _set_rng_states(loaded["rng_state"])
    return LoadedCheckpoint(
        step=int(common["step"]),
        extra_state=common["extra_state"],
        path=path,
        reference_dir=reference_dir,
        saved_layout=saved_layout,
        optimizer_restored=load_optimizer,
        rng_restored=restore_rng,
        manifest=manifest,
    )


def _describe(layout: dict) -> str:
    return "TP={tensor_parallel_size} PP={pipeline_parallel_size} DP={data_parallel_size}".format(**layout)


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """True for a checkpoint root written by ``save_checkpoint`` (or one of its ``step_*`` directories)."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, LATEST_FILE)) or os.path.isfile(os.path.join(path, MANIFEST_FILE))


def export_checkpoint_to_hf(ckpt: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None) -> str:
    """Write the policy of a training checkpoint as a plain Hugging Face directory; returns the step directory.

    Call under ``init_parallel`` (one process is enough: the weights reshard to this layout). The model shape,
    tokenizer and config come from the reference directory the checkpoint names (policy and reference share
    one layout).

    Raises:
        CheckpointError: the checkpoint names no reference directory, or it no longer exists.
    """
    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
    from nemo_logitavg.models.hf_conversion import export_model_hf

    ckpt = os.fspath(ckpt)
    if os.path.isfile(os.path.join(ckpt, MANIFEST_FILE)):  # a step directory: its parent is the root
        step = read_manifest(ckpt)["step"] if step is None else step
        ckpt = os.path.dirname(os.path.abspath(ckpt))
    path = find_checkpoint(ckpt, step)
    reference_dir = read_manifest(path).get("reference_dir")
    if not reference_dir or not os.path.isdir(reference_dir):
        raise CheckpointError(
            f"{path}: needs the reference directory it names ({reference_dir!r}) for the model's shape and tokenizer"
        )
    cfg = LlamaConfig.from_hf(reference_dir)
    actor = LogitAveragingActor(cfg, None, ActorConfig())
    load_checkpoint(
        actor, ckpt, read_manifest(path)["step"], load_optimizer=False, load_rng=False, load_reference=False
    )
    export_model_hf(actor.gpt_policy, cfg, out_dir, source_dir=reference_dir)
    return path

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

import contextlib
import importlib
import io
import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nemo_logitavg.models import LlamaConfig
from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
from nemo_logitavg.models.conversion.loading import load_hf_into_mcore
from nemo_logitavg.models.conversion.mcore_checkpoint import load_mcore_checkpoint

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
    # megatron-core is heavy (~3 s after torch): the job imports this module for latest_step without it
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
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} does not hold a step number (it is not text)") from None
    if not text.isdigit():
        raise CheckpointError(f"{path} does not hold a step number (it holds {text[:40]!r})")
    return int(text)


def find_checkpoint(ckpt_root: str | os.PathLike, step: int | None = None) -> str:
    """The directory of a complete checkpoint: ``step``'s, or the one ``latest`` names when ``step`` is None.

    Pure file-system checks, the same on every rank; ``.tmp`` directories are never considered. When ``latest``
    names a directory that does not exist (a crash between the two renames of a same-step re-save) or does not
    hold a step number, the newest complete step directory is used instead, with a warning: a resume goes on
    from the last state known to be whole rather than stopping the job.

    Raises:
        CheckpointNotFoundError: no ``ckpt_root``, no ``latest`` in it (with step None), or no directory for
            the step (nor, with step None, a complete one to fall back to). CheckpointError: a directory that
            lacks files a complete checkpoint has (a partial or corrupted checkpoint), an unreadable manifest, or
            a corrupt ``latest`` with nothing to fall back to.
    """
    root = os.fspath(ckpt_root)
    if not os.path.isdir(root):
        raise CheckpointNotFoundError(f"checkpoint root {root} does not exist")
    if step is not None:
        return _complete_checkpoint(root, step)
    latest = os.path.join(root, LATEST_FILE)
    try:
        step = latest_step(root)
    except CheckpointError as exc:
        problem: CheckpointError = exc
    else:
        if step is None:
            found = complete_steps(root)
            hint = f" (complete-looking step directories there: {found})" if found else ""
            raise CheckpointNotFoundError(
                f"no '{LATEST_FILE}' file in checkpoint root {root}: no checkpoint was completed there{hint}"
            )
        path = os.path.join(root, step_dir_name(step))
        if os.path.isdir(path):
            return _complete_checkpoint(root, step)
        partial = " (only a partial save, .tmp, exists)" if os.path.isdir(path + TMP_SUFFIX) else ""
        problem = CheckpointNotFoundError(f"checkpoint directory {path} (named by {latest}) does not exist{partial}")
    for candidate in reversed(complete_steps(root)):
        try:
            path = _complete_checkpoint(root, candidate)
        except CheckpointError:
            continue
        warnings.warn(f"{problem}; resuming from the newest complete checkpoint, {path}", stacklevel=2)
        return path
    raise type(problem)(f"{problem}; no complete checkpoint in {root} to fall back to") from None


def _complete_checkpoint(root: str, step: int) -> str:
    """``root``'s directory for ``step`` after checking that it is complete (see ``find_checkpoint``)."""
    path = os.path.join(root, step_dir_name(step))
    if not os.path.isdir(path):
        partial = " (only a partial save, .tmp, exists)" if os.path.isdir(path + TMP_SUFFIX) else ""
        raise CheckpointNotFoundError(f"checkpoint directory {path} does not exist{partial}")
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
    """This rank's RNG states as tensors and plain data (what ``torch.load(weights_only=True)`` reads back)."""
    # megatron-core is heavy (~3 s after torch): the job imports this module for latest_step without it
    from megatron.core import tensor_parallel

    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    states = {
        "random": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        # Megatron's named model-parallel streams (CPU generator states under cpu_compat).
        "tracker": dict(tensor_parallel.get_cuda_rng_tracker().get_states()),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    # megatron-core is heavy (~3 s after torch): the job imports this module for latest_step without it
    from megatron.core import tensor_parallel

    python, numpy_state = states["random"], states["numpy"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])


def _rng_sharded_object(layout: dict, with_data: bool):
    # megatron-core is heavy (~3 s after torch): the job imports this module for latest_step without it
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
    # megatron-core is heavy (~3 s after torch): the job imports this module for latest_step without it
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


# What torch.distributed.checkpoint's index (``.metadata``, a plain pickle that it reads with ``pickle.load``) may
# name: its own metadata and plan classes, torch sizes, dtypes, layouts and memory formats. Anything else (e.g.
# ``os.system``) would run code when unpickled.
_INDEX_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_INDEX_GLOBALS = {
    ("torch", "Size"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module, name) in _INDEX_GLOBALS
        if module in _INDEX_MODULES:  # a class defined there (dataclasses, enums), not a name it imported
            value = getattr(importlib.import_module(module), name, None)
            allowed = isinstance(value, type) and value.__module__ == module
        elif module == "torch":
            value = getattr(torch, name, None)
            allowed = allowed or isinstance(value, torch.dtype | torch.layout | torch.memory_format)
        if not allowed:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not checkpoint metadata")
        return super().find_class(module, name)


def check_index(path: str | os.PathLike) -> None:
    """Read a checkpoint directory's torch_dist index (``.metadata``) without running code from it.

    torch reads that file with ``pickle.load``: whoever can write a checkpoint directory could otherwise run code in
    the process that loads it. Called by ``load_checkpoint`` on every rank before megatron reads the index (a
    file swapped in between this check and that read is not caught: keep checkpoint roots writable only by the
    job).

    Raises:
        CheckpointError: the index names anything but checkpoint metadata, or is not a pickle.
    """
    file = os.path.join(os.fspath(path), ".metadata")
    try:
        with open(file, "rb") as f:
            _IndexUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise CheckpointError(
            f"{file} is refused: {exc} (checkpoints are read without running code from them)"
        ) from None


@contextlib.contextmanager
def _weights_only_loads():
    """Every ``torch.load`` inside (megatron's common state and object shards, which torch's planner loads with
    ``weights_only=False``) reads tensors and plain data only, via torch's own switch for that."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _load_reference(actor: LogitAveragingActor, reference_dir: str, path: str) -> None:
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
    # megatron-core and torch.distributed.checkpoint are heavy (~3 s, ~0.8 s): the job imports this module without them
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    path = find_checkpoint(ckpt_root, step)
    check_index(path)
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
        with _weights_only_loads():
            loaded = dist_checkpointing.load(state, path, strict=StrictHandling.RAISE_UNEXPECTED)
    except (Exception, CheckpointException) as exc:  # torch's CheckpointException is a BaseException
        refused = _refused_global(exc)
        if refused is not None:
            raise CheckpointError(
                f"checkpoint {path} holds a pickled {refused}, not tensors or plain data: refused (checkpoints "
                "are read without running code from them, torch.load(weights_only=True))"
            ) from None
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


def _refused_global(exc: BaseException) -> str | None:
    """The global that torch's weights-only unpickler refused somewhere in ``exc``'s chain, if that is the cause."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if "Weights only load failed" in str(exc):
            match = re.search(r"GLOBAL (\S+)", str(exc))
            return match.group(1) if match else "object"
        exc = exc.__cause__ or exc.__context__
    return None


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
    # the streaming export imports megatron-core (heavy, ~3 s) at its top: loaded when a checkpoint is exported
    from nemo_logitavg.models.conversion.streaming import export_model_hf

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

"""The trainer side of a weight push: write the policy once, in Hugging Face safetensors, where servers read it.

On the trainer, after an update::

    shards = gather_mcore_shards(policy_model)            # models.hf_conversion, collective over TP/PP
    if rank == 0:
        state = mcore_to_hf_state_dict(shards, cfg)
        path = write_policy_for_servers(state, shared_dir, step, cfg=cfg, source_dir=hf_dir)
        client.load_weights(path, step)                    # every server reloads the policy half only

Only the policy moves; the reference never changes after start-up. The directory appears atomically (written
under a temporary name in ``out_dir``, then renamed), so a server never reads a half-written step. ``out_dir`` must
be on a file system every server can read (a shared mount on a cluster).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping

import torch

STEP_FILE = "nemo_logitavg_step.json"
_STEP_DIR = re.compile(r"^policy_step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"policy_step_{int(step):08d}"


def write_policy_for_servers(
    policy: Mapping[str, torch.Tensor] | str | os.PathLike,
    out_dir: str | os.PathLike,
    step: int,
    *,
    cfg=None,
    source_dir: str | os.PathLike | None = None,
    keep: int = 2,
) -> str:
    """Write the policy for step ``step`` to ``out_dir/policy_step_{step:08d}`` and return that path.

    Args:
        policy: a full Hugging Face state dict (``mcore_to_hf_state_dict``'s output) or a Hugging Face
            directory (copied: config, safetensors and tokenizer files).
        out_dir: the shared directory; created if needed.
        step: the optimiser step these weights belong to (the servers report it back).
        cfg: the ``LlamaConfig`` of a state dict; read from ``source_dir``'s config.json when omitted.
        source_dir: a Hugging Face directory whose config and tokenizer files accompany a state dict.
        keep: how many ``policy_step_*`` directories to keep (older ones are removed; the new one always stays).
    """
    if int(step) < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, step_dir_name(step))
    tmp = tempfile.mkdtemp(prefix=f".tmp-{step_dir_name(step)}-", dir=out_dir)
    try:
        if isinstance(policy, Mapping):
            from nemo_logitavg.models.builder import LlamaConfig
            from nemo_logitavg.models.hf_conversion import export_hf

            if cfg is None:
                if source_dir is None:
                    raise ValueError("a state dict needs cfg= or source_dir= (a directory with its config.json)")
                cfg = LlamaConfig.from_hf(os.fspath(source_dir))
            export_hf(policy, tmp, cfg, source_dir=source_dir)
        else:
            src = os.fspath(policy)
            if not os.path.isfile(os.path.join(src, "config.json")):
                raise FileNotFoundError(f"{src} is not a Hugging Face directory (no config.json)")
            for name in sorted(os.listdir(src)):
                path = os.path.join(src, name)
                if os.path.isfile(path) and not name.startswith(".") and name != STEP_FILE:
                    shutil.copy2(path, os.path.join(tmp, name))
        with open(os.path.join(tmp, STEP_FILE), "w", encoding="utf-8") as f:
            json.dump({"step": int(step)}, f)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; servers may run as another user
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".old-{step_dir_name(step)}-", dir=out_dir)
            os.rename(final, os.path.join(old, "dir"))
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(out_dir, keep, final)
    return final


def _prune(out_dir: str, keep: int, current: str) -> None:
    steps = sorted((int(m.group(1)), name) for name in os.listdir(out_dir) if (m := _STEP_DIR.match(name)) is not None)
    for _, name in steps[: max(0, len(steps) - max(1, int(keep)))]:
        path = os.path.join(out_dir, name)
        if os.path.abspath(path) != os.path.abspath(current):
            shutil.rmtree(path, ignore_errors=True)


def push_policy(client, policy, out_dir: str | os.PathLike, step: int, **kwargs) -> str:
    """``write_policy_for_servers`` then ``client.load_weights(path, step)``; returns the path."""
    path = write_policy_for_servers(policy, out_dir, step, **kwargs)
    client.load_weights(path, step)
    return path

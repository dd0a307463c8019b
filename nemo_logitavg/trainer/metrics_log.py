"""The one metrics logger of the training loops (GRPO and SFT): a jsonl file, TensorBoard, W&B, a console line."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable

from nemo_logitavg.config import redact_secrets

# The console line of a step: ``progress(step, total_steps, metrics, eta_s)``.
Progress = Callable[[int, int, dict[str, float], float], str]


def grpo_progress(step: int, total: int, metrics: dict[str, float], eta_s: float) -> str:
    return (
        f"[grpo] step {step}/{total}  reward {metrics.get('reward/mean', float('nan')):.3f}  "
        f"len {metrics.get('response/length', 0):.0f}  loss {metrics.get('loss', 0):+.4f}  "
        f"ETA {eta_s / 60:.1f} min"
    )


def sft_progress(step: int, total: int, metrics: dict[str, float], eta_s: float) -> str:
    return (
        f"[sft] step {step}/{total}  loss {metrics['loss']:.4f}  grad-norm {metrics['grad_norm']:.3f}  "
        f"ETA {eta_s / 60:.1f} min"
    )


class MetricsLog:
    """Per-step scalars to ``metrics.jsonl``, TensorBoard and (when configured) W&B, plus a console progress line.

    The defaults are GRPO's (``run_dir/metrics.jsonl`` with sorted keys, ``run_dir/tensorboard``, the ``[grpo]``
    line). SFT keeps its own files: ``filename`` its jsonl (None: none), no TensorBoard, keys in the order given,
    the ``[sft]`` line. The ETA counts from the construction and the first step written (a resumed run's first).
    """

    def __init__(
        self,
        run_dir: str,
        total_steps: int,
        wandb_project: str | None = None,
        config: dict | None = None,
        *,
        filename: str | None = "metrics.jsonl",
        tensorboard: bool = True,
        progress: Progress = grpo_progress,
        sort_keys: bool = True,
    ) -> None:
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, filename) if filename else None
        self.total = total_steps
        self.progress, self.sort_keys = progress, sort_keys
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard may not be installed

                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:  # tensorboard not installed: the JSONL still has everything
                self.tb = None
        self.wandb = None
        if wandb_project:
            try:
                import wandb  # optional: only runs with run.wandb_project need it
            except ImportError:
                raise RuntimeError("run.wandb_project is set but wandb is not installed: pip install wandb") from None
            # One W&B run per run directory, continued when the job resumes (WANDB_MODE=offline works too).
            id_file = os.path.join(run_dir, "wandb_run_id")
            if os.path.exists(id_file):
                with open(id_file, encoding="utf-8") as fh:
                    run_id = fh.read().strip()
            else:
                run_id = hashlib.sha256(os.path.abspath(run_dir).encode() + os.urandom(8)).hexdigest()[:12]
                with open(id_file, "w", encoding="utf-8") as fh:
                    fh.write(run_id)
            config = redact_secrets(config) if config is not None else None  # W&B uploads it: never the token
            self.wandb = wandb.init(project=wandb_project, dir=run_dir, id=run_id, resume="allow", config=config)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` (plain floats) as step ``step`` everywhere, then print the progress line."""
        if self.first_step is None:
            self.first_step = step
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, **metrics}, sort_keys=self.sort_keys) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        done = step - self.first_step + 1
        eta = (time.monotonic() - self.started) / done * (self.total - step)
        print(self.progress(step, self.total, metrics, eta), flush=True)

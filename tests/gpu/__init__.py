"""The one-GPU checks, run by tests/gpu/smoke.sh; each module sets ``pytestmark = GPU`` (plus its own skips).

Each part's wall-clock limit is one number, in tests/gpu/limits.txt: smoke.sh kills the part's pytest at it, and
the tests give their subprocesses ``inner_timeout(part)``, what is left of it less ``MARGIN_S``.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import pytest
import torch

LIMITS_FILE = Path(__file__).with_name("limits.txt")
MARGIN_S = 10.0  # left to pytest to report a subprocess that timed out before smoke.sh's timeout kills it


def read_limits(path: Path = LIMITS_FILE) -> dict[str, dict]:
    """``{part: {"limit_s", "file", "required"}}`` from limits.txt, in its order."""
    parts = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, limit, file, need = line.split()
            parts[name] = {"limit_s": int(limit), "file": file, "required": need == "must"}
    return parts


LIMITS = read_limits()


def inner_timeout(part: str, environ=None, now: float | None = None) -> float:
    """Seconds a subprocess of ``part`` may take: the part's limit less ``MARGIN_S``, counted from when smoke.sh
    started the part (``SMOKE_PART_STARTED``, seconds since the epoch) or, run by hand, from now."""
    environ = os.environ if environ is None else environ
    now = time.time() if now is None else now
    started = float(environ.get("SMOKE_PART_STARTED", now))
    return max(1.0, started + LIMITS[part]["limit_s"] - MARGIN_S - now)


def _import_reason(module: str) -> str | None:
    """None when ``module`` imports; else why not (TE raises RuntimeError/OSError without a GPU or its libraries)."""
    try:
        importlib.import_module(module)
    except (ImportError, RuntimeError, OSError) as exc:
        return f"{module} does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


CUDA_COUNT = torch.cuda.device_count() if torch.cuda.is_available() else 0
# Marked `gpu`, and skipped with the reason where CUDA is absent (the CPU runs report them as skipped).
GPU = [pytest.mark.gpu, pytest.mark.skipif(CUDA_COUNT == 0, reason="CUDA is not available")]
TWO_GPUS = pytest.mark.skipif(CUDA_COUNT < 2, reason=f"needs 2 CUDA devices, {CUDA_COUNT} present")


def needs_module(module: str):
    """skipif ``module`` does not import (imported at collection, only by the files that need it)."""
    reason = _import_reason(module)
    return pytest.mark.skipif(reason is not None, reason=reason or "")

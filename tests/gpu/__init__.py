"""The one-GPU checks, run by tests/gpu/smoke.sh; each module sets ``pytestmark = GPU``."""

from __future__ import annotations

import pytest
import torch

# Marked `gpu`, and skipped with the reason where CUDA is absent (the CPU runs report them as skipped).
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]

"""Numerical kernels that import nothing else of the package."""

from nemo_logitavg.ops.mixed_logprobs import mixed_logprobs
from nemo_logitavg.ops.ref_weight import check_ref_weight, mixes_reference

__all__ = ["check_ref_weight", "mixed_logprobs", "mixes_reference"]

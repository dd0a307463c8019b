"""Numerical kernels that import nothing else of the package."""

from nemo_logitavg.ops.mixed_logprobs import mixed_logprobs

__all__ = ["mixed_logprobs"]

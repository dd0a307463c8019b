"""The reference weight ``a`` of pi_mix = softmax(((1 - a) z_pol + a z_ref) / T): its range and what ``a = 0``
means, decided here once for the op, the actor, the configs, the bundle and every rollout engine."""

from __future__ import annotations


def check_ref_weight(ref_weight: float, setting: str = "ref_weight") -> float:
    """``ref_weight`` as a float in [0, 1]; a ValueError naming ``setting`` (the config key or argument) if not."""
    value = float(ref_weight)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{setting} must lie in [0, 1], got {ref_weight}")
    return value


def mixes_reference(ref_weight: float) -> bool:
    """Whether pi_mix depends on the reference at all: at ``a = 0`` it is the policy's own softmax, so samplers
    need not load or run the reference model (the KL baseline still needs it in the trainer for log pi_ref)."""
    return check_ref_weight(ref_weight) != 0.0

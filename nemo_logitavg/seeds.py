"""Every seed of a rollout, derived in one place (standard library only: the client imports it without torch).

A completion's randomness comes down a chain of seeds, each a hash of the one above and an index:

    run seed r ──step_seed(r, t)──> step seed s ──prompt_seed(s, i)──> prompt seed p ──sequence_seed(p, j)──> g
    (config)      the step's call seed            prompt i of the call            sample j's torch.Generator / vLLM seed

- the trainer calls the rollout client with ``seed = step_seed(run.seed, step)`` (and, to redo prompts ``k`` of
  that step alone, with ``seeds = prompt_seeds(s, k)``);
- the client and the server give prompt ``i`` of a call (request) with seed ``s`` the seed ``prompt_seed(s, i)``,
  so a completion does not depend on how the prompts were cut into requests or which server answers;
- an engine samples completion ``j`` of a prompt with seed ``p`` from ``sequence_seed(p, j)`` (the torch engine's
  generator, vLLM's per-request seed), so a completion does not depend on the batch it decodes in.

Every function is ``sha256`` over the decimal integers joined by ``":"`` (e.g. ``b"7:3"``), read little-endian:
the step seed from the first 4 bytes (32 bits), the others from the first 8 bytes masked to 63 bits. These
values are part of the run's identity (``rollouts.jsonl`` records the step seed; a resumed run regenerates the
same completions): changing a formula changes every figure a run reports.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

_MASK_63 = (1 << 63) - 1


def _digest(*parts: int) -> bytes:
    return hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. a seed and an index); stable across processes and machines."""
    return int.from_bytes(_digest(*parts)[:8], "little") & _MASK_63


def step_seed(run_seed: int, step: int) -> int:
    """The rollout seed of a training step (32 bits): the seed of the step's one ``RolloutClient.generate`` call."""
    return int.from_bytes(_digest(run_seed, step)[:4], "little")


def prompt_seed(call_seed: int, index: int) -> int:
    """The seed of prompt ``index`` of a call or request with seed ``call_seed`` (63 bits)."""
    return derive_seed(call_seed, index)


def prompt_seeds(call_seed: int, indices: Iterable[int]) -> list[int]:
    """``prompt_seed(call_seed, i)`` for each ``i`` of ``indices``, in order."""
    return [derive_seed(call_seed, i) for i in indices]


def sequence_seed(seed: int, sample: int) -> int:
    """The seed of completion ``sample`` of a prompt whose own seed is ``seed`` (63 bits): an engine's
    per-sequence generator seed."""
    return derive_seed(seed, sample)

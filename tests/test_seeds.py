"""The seeds of a rollout are part of a run's identity: pin them against the documented formula, written out here
with hashlib (not through ``nemo_logitavg.seeds``), and against literal values, so any drift fails."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from nemo_logitavg.seeds import derive_seed, prompt_seed, prompt_seeds, sequence_seed, step_seed


def _sha(text: str) -> bytes:
    return hashlib.sha256(text.encode("ascii")).digest()


def test_step_seed_is_the_first_4_bytes_of_sha256_of_run_colon_step():
    for run, step in [(1234, 0), (1234, 7), (1, 2), (0, 0), (2**31 - 1, 99_999)]:
        assert step_seed(run, step) == int.from_bytes(_sha(f"{run}:{step}")[:4], "little")
    assert step_seed(1234, 0) == 38957178  # the default run.seed's first step
    assert step_seed(1234, 7) == 3072489950


def test_prompt_and_sequence_seeds_are_63_bits_of_sha256_of_seed_colon_index():
    mask = (1 << 63) - 1
    s = step_seed(1234, 7)
    for i in (0, 3, 63):
        assert prompt_seed(s, i) == int.from_bytes(_sha(f"{s}:{i}")[:8], "little") & mask
        p = prompt_seed(s, i)
        for j in (0, 1, 7):
            assert sequence_seed(p, j) == int.from_bytes(_sha(f"{p}:{j}")[:8], "little") & mask
    assert prompt_seed(s, 3) == 9097251127670004867
    assert sequence_seed(prompt_seed(s, 3), 1) == 7640930283897531854
    assert prompt_seeds(42, [0, 9]) == [8283191608820986708, 8925589490396820345]
    assert prompt_seeds(42, range(10)) == [prompt_seed(42, i) for i in range(10)]
    assert derive_seed(1234, 7, 3) == int.from_bytes(_sha("1234:7:3")[:8], "little") & mask


def test_the_seeds_and_the_client_import_no_torch():
    code = (
        "import sys, nemo_logitavg.seeds, nemo_logitavg.rollout.client; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

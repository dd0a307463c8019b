"""Serving a model for evaluation: start a rollout server for it, sample completions of the test prompts and
score them into ``Run`` s (``scoring``).

Models. ``resolve_model`` accepts

- a Hugging Face directory (``config.json``): served alone (the server gets it as policy and reference with
  ``ref_weight = 0``, so pi_mix is the model itself);
- a Megatron checkpoint written by ``recipes/convert_hf_to_mcore.py`` (``meta.json`` + ``mp_rank_*``): converted to
  a Hugging Face directory in a work directory first;
- an averaged-model bundle (``nemo_logitavg.models.bundle``, docs/design.md §7). The headline model is pi_mix;
  ``policy_alone=True`` serves its policy half alone.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from nemo_logitavg.data.prompts import encode_prompt
from nemo_logitavg.evaluation.scoring import Run, SamplingMode, score_records, summarize
from nemo_logitavg.models.bundle import is_bundle, read_bundle
from nemo_logitavg.models.conversion.mcore_checkpoint import convert_mcore_to_hf
from nemo_logitavg.rewards import GRADE_TIMEOUT
from nemo_logitavg.rollout.client import RolloutClient
from nemo_logitavg.rollout.process import ServerProcess

logger = logging.getLogger(__name__)


def is_mcore_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint of ``recipes/convert_hf_to_mcore.py`` (``meta.json`` + ``mp_rank_*``)."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "meta.json")) and any(
        name.startswith("mp_rank_") for name in os.listdir(path)
    )


@dataclass
class ServedModel:
    """What a rollout server is started with to serve a model."""

    policy: str
    reference: str | None  # None: the policy alone (ref_weight 0), one model loaded
    ref_weight: float
    kind: str  # "hf", "mcore" or "bundle"


def resolve_model(path: str | os.PathLike, workdir: str, policy_alone: bool = False) -> ServedModel:
    """How to serve ``path`` (see the module docstring); a Megatron checkpoint is converted into ``workdir``."""
    path = os.fspath(path)
    if is_bundle(path):
        bundle = read_bundle(path)
        if policy_alone:
            return ServedModel(bundle.policy, None, 0.0, "bundle")
        return ServedModel(bundle.policy, bundle.reference, bundle.ref_weight, "bundle")
    if is_mcore_checkpoint(path):
        hf_dir = tempfile.mkdtemp(prefix="hf_", dir=workdir)
        convert_mcore_to_hf(path, hf_dir)
        return ServedModel(hf_dir, None, 0.0, "mcore")
    if os.path.isfile(os.path.join(path, "config.json")):
        return ServedModel(path, None, 0.0, "hf")
    raise ValueError(f"{path}: neither a Hugging Face directory, a Megatron converter checkpoint nor a bundle")


def generate(
    client, tokenizer, records: Sequence[dict], mode: SamplingMode, max_tokens: int, seed: int, batch: int = 256
) -> list[list]:
    """Completions of every record's prompt (k each) through a ``RolloutClient``, in record order, ``batch``
    prompts a request (the torch engine decodes a request's sequences together: fewer, wider steps)."""
    out: list[list] = []
    for start in range(0, len(records), batch):
        part = records[start : start + batch]
        ids = [encode_prompt(r["prompt"], tokenizer) for r in part]
        out += client.generate(
            ids, n=mode.k, max_tokens=max_tokens, temperature=mode.temperature, top_p=mode.top_p,
            seed=seed * 1_000_003 + start,
        )  # fmt: skip
        logger.info("generated %d/%d (%s, seed %d)", len(out), len(records), mode.name, seed)
    return out


def evaluate_served(
    client, tokenizer, name: str, records: Sequence[dict], modes: Sequence[SamplingMode], seeds: Sequence[int],
    max_tokens: int, math_timeout: float = GRADE_TIMEOUT, num_resamples: int = 10_000,
) -> list[Run]:  # fmt: skip
    """Runs of one served model over ``records`` for every mode and seed (greedy modes once, with the first
    seed), one Run per dataset (record ``source``)."""
    runs = []
    for mode in modes:
        for seed in seeds[:1] if mode.greedy else seeds:
            completions = generate(client, tokenizer, records, mode, max_tokens, seed)
            rows = score_records(records, completions, math_timeout)
            for dataset in sorted({r["source"] for r in records}):
                part = [row for row in rows if row["source"] == dataset]
                runs.append(Run(name, mode.name, dataset, seed, summarize(part, num_resamples, seed), part))
    return runs


def evaluate_model(
    path: str, name: str, records: Sequence[dict], modes: Sequence[SamplingMode], seeds: Sequence[int],
    max_tokens: int, workdir: str, policy_alone: bool = False, math_timeout: float = GRADE_TIMEOUT,
    num_resamples: int = 10_000, server_args: Sequence[str] = (), ready_timeout: float = 600.0,
) -> list[Run]:  # fmt: skip
    """Serve the model at ``path`` (see ``resolve_model``) with a rollout server on 127.0.0.1 (a child process,
    stopped at the end; its log is ``workdir/<name>.server.log``; a random bearer token) and evaluate it."""
    # transformers takes ~1 s to import: paid when a model is served, not by the job that imports evaluation
    from transformers import AutoTokenizer

    os.makedirs(workdir, exist_ok=True)
    served = resolve_model(path, workdir, policy_alone=policy_alone)
    tokenizer = AutoTokenizer.from_pretrained(served.policy)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    log = os.path.join(workdir, f"{safe}.server.log")
    server = ServerProcess(served.policy, served.reference, served.ref_weight, log, extra_args=list(server_args))
    try:
        server.wait_ready(ready_timeout)
        with RolloutClient(server.url, token=server.token, timeout=3600.0) as client:
            client.check(served.ref_weight)
            return evaluate_served(
                client, tokenizer, name, records, modes, seeds, max_tokens, math_timeout, num_resamples
            )
    finally:
        server.stop()


__all__ = ["ServedModel", "evaluate_model", "evaluate_served", "generate", "is_mcore_checkpoint", "resolve_model"]

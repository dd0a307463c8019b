r"""Benchmark loaders: source records (in their published formats) to prompt records (see ``prompts``).

=========  ==========================================================  ============================================
dataset    source record                                               gold answer
=========  ==========================================================  ============================================
MATH       ``problem``, ``solution``, ``level``, ``type`` (Hendrycks)  the last ``\boxed{}`` of ``solution``
cn-k12     NuminaMath-CoT: ``source``, ``problem``, ``solution``,      the last ``\boxed{}`` of ``solution``; only
           ``messages``                                                records with ``source == "cn_k12"`` are kept
MMLU       ``question``, ``choices`` (4), ``answer`` (index 0-3 or    the letter A-D
           a letter), optional ``subject``
GSM8K      ``question``, ``answer`` (reasoning, final ``#### N``)     N (thousands separators removed)
=========  ==========================================================  ============================================

Every ``*_record(raw, where)`` converts one source record and raises ``ValueError("<where>: reason")`` when the
record is malformed (a missing or mistyped field, a bad answer index, no ``####`` line). A record that is well
formed but unusable (a MATH/cn-k12 solution without a closed ``\boxed{}``; another NuminaMath source) returns
None and is counted. ``load_jsonl_dataset`` reads ``.jsonl`` or ``.jsonl.gz`` files with ``where = file:line``.

A record's id is ``<source>/<first 16 hex digits of sha256 of the normalised question>``: stable across file
orders and copies, equal for duplicates, and the key of the deterministic train/test split (``split_by_hash``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from nemo_logitavg.data.jsonl import iter_jsonl
from nemo_logitavg.data.prompts import CHOICE_LETTERS, math_prompt, mcq_prompt, normalise_prompt
from nemo_logitavg.rewards import extract_last_boxed

DATASETS = ("math", "gsm8k", "mmlu", "cn_k12")


def record_id(source: str, question: str) -> str:
    digest = hashlib.sha256(normalise_prompt(question).encode("utf-8")).hexdigest()[:16]
    return f"{source}/{digest}"


def _string(raw: dict, key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string")
    return value


def _boxed_gold(solution: str) -> str | None:
    gold = extract_last_boxed(solution)
    return gold if gold else None


def math_record(raw: dict, where: str, source: str = "math") -> dict | None:
    r"""A MATH (Hendrycks) problem; None when its solution has no closed, non-empty ``\boxed{}``."""
    problem = _string(raw, "problem", where)
    solution = _string(raw, "solution", where)
    meta = {}
    for key in ("level", "type", "subject", "unique_id"):
        value = raw.get(key)
        if value is not None and not isinstance(value, (str, int)):
            raise ValueError(f"{where}: field {key!r} must be a string or an integer")
        if value is not None:
            meta[key] = value
    gold = _boxed_gold(solution)
    if gold is None:
        return None
    return {
        "id": record_id(source, problem),
        "source": source,
        "prompt": math_prompt(problem),
        "answer": gold,
        "reward": "math",
        "meta": meta,
    }


def cn_k12_record(raw: dict, where: str) -> dict | None:
    r"""A NuminaMath-CoT record: None unless ``source == "cn_k12"`` and its solution has a ``\boxed{}`` answer."""
    origin = _string(raw, "source", where)
    problem = _string(raw, "problem", where)
    solution = _string(raw, "solution", where)
    messages = raw.get("messages")
    if messages is not None and not isinstance(messages, list):
        raise ValueError(f"{where}: field 'messages' must be a list")
    if origin != "cn_k12":
        return None
    gold = _boxed_gold(solution)
    if gold is None:
        return None
    return {
        "id": record_id("cn_k12", problem),
        "source": "cn_k12",
        "prompt": math_prompt(problem),
        "answer": gold,
        "reward": "math",
        "meta": {},
    }


def mmlu_record(raw: dict, where: str, source: str = "mmlu") -> dict:
    """An MMLU question with four choices; the gold index (0-3) or letter becomes the letter A-D. ``subject`` and
    ``type`` (strings, optional) go to ``meta``."""
    question = _string(raw, "question", where)
    choices = raw.get("choices")
    if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, (str, int, float)) for c in choices):
        raise ValueError(f"{where}: field 'choices' must be a list of 4 strings")
    answer = raw.get("answer")
    if isinstance(answer, bool):
        answer = None
    if isinstance(answer, int) and 0 <= answer < 4:
        letter = CHOICE_LETTERS[answer]
    elif isinstance(answer, str) and answer.strip().upper() in CHOICE_LETTERS:
        letter = answer.strip().upper()
    else:
        raise ValueError(f"{where}: field 'answer' must be an index 0-3 or a letter A-D, got {answer!r}")
    prompt = mcq_prompt(question, [str(c) for c in choices])
    return {
        "id": record_id(source, prompt),  # the choices are part of the question's identity
        "source": source,
        "prompt": prompt,
        "answer": letter,
        "reward": "mcq",
        "meta": {key: raw[key] for key in ("subject", "type") if isinstance(raw.get(key), str) and raw[key]},
    }


_GSM8K_FINAL = re.compile(r"^####\s*(.+?)\s*$", re.MULTILINE)


def gsm8k_answer(answer: str) -> str | None:
    """The number after the last ``####`` line, thousands separators removed; None without one."""
    matches = _GSM8K_FINAL.findall(answer)
    if not matches:
        return None
    final = matches[-1].replace(",", "").replace("$", "").strip()
    return final or None


def gsm8k_record(raw: dict, where: str) -> dict:
    question = _string(raw, "question", where)
    gold = gsm8k_answer(_string(raw, "answer", where))
    if gold is None:
        raise ValueError(f"{where}: field 'answer' has no final '#### N' line")
    return {
        "id": record_id("gsm8k", question),
        "source": "gsm8k",
        "prompt": math_prompt(question),
        "answer": gold,
        "reward": "math",
        "meta": {},
    }


CONVERTERS: dict[str, Callable[[dict, str], dict | None]] = {
    "math": math_record,
    "cn_k12": cn_k12_record,
    "mmlu": mmlu_record,
    "gsm8k": gsm8k_record,
}


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class LoadStats:
    """What a load saw: records read, converted, skipped (other source / no gold answer), dropped as duplicates."""

    read: int = 0
    converted: int = 0
    other_source: int = 0
    no_answer: int = 0
    duplicates: int = 0
    conflicting_duplicates: int = 0  # duplicates whose gold answer differs from the kept record's

    def add(self, other: LoadStats) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)


def convert(dataset: str, items: Iterable[tuple[str, dict]], stats: LoadStats | None = None) -> list[dict]:
    """Prompt records of ``(where, source record)`` pairs of ``dataset`` (no dedup); counts go to ``stats``."""
    if dataset not in CONVERTERS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    stats = stats if stats is not None else LoadStats()
    converter = CONVERTERS[dataset]
    out = []
    for where, raw in items:
        stats.read += 1
        record = converter(raw, where)
        if record is None:
            if dataset == "cn_k12" and raw.get("source") != "cn_k12":
                stats.other_source += 1
            else:
                stats.no_answer += 1
            continue
        out.append(record)
    stats.converted += len(out)
    return out


def load_jsonl_dataset(
    dataset: str, path: str | os.PathLike, stats: LoadStats | None = None, unwrap: str | None = None
) -> list[dict]:
    """Prompt records of a source file in ``dataset``'s published format (``.jsonl`` or ``.jsonl.gz``)."""
    return convert(dataset, iter_jsonl(path, unwrap=unwrap), stats)


def dedupe(records: Iterable[dict], stats: LoadStats | None = None) -> list[dict]:
    """Keep the first record of each normalised prompt text; count the others (and those whose answers differ)."""
    stats = stats if stats is not None else LoadStats()
    kept: dict[str, dict] = {}
    for record in records:
        key = normalise_prompt(record["prompt"])
        first = kept.get(key)
        if first is None:
            kept[key] = record
            continue
        stats.duplicates += 1
        if first["answer"] != record["answer"]:
            stats.conflicting_duplicates += 1
    return list(kept.values())


def hash_fraction(key: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by ``key`` (and ``salt``): sha256 of ``salt:key``, first 8 bytes."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_hash(records: Iterable[dict], test_fraction: float, salt: str = "") -> tuple[list[dict], list[dict]]:
    """(train, test): a record goes to test when ``hash_fraction(id, salt) < test_fraction``. Deterministic,
    independent of order and of the other records, and stable when a dataset grows."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1], got {test_fraction}")
    train, test = [], []
    for record in records:
        (test if hash_fraction(record["id"], salt) < test_fraction else train).append(record)
    return train, test

r"""Prompt records and their templates.

A prompt record (one jsonl line of a prepared train or test file)::

    {"id": "math/3f2a...", "source": "math", "prompt": "...", "answer": "\\frac{1}{2}", "reward": "math"}

- ``prompt`` is the user message (the question plus the instruction to put the final answer in ``\boxed{}``),
  not yet wrapped in any chat template: ``encode_prompt`` applies the tokenizer's chat template at tokenization
  time, so one prepared file serves base and chat models alike.
- ``answer`` is bare LaTeX for ``reward == "math"`` (no ``$``, no ``\boxed``) and one letter A-D for
  ``reward == "mcq"``.
- An optional ``meta`` object carries what the source had beside (level, type, subject, ...).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence

from nemo_logitavg.data.jsonl import iter_jsonl
from nemo_logitavg.rewards.by_kind import REWARD_KINDS

REQUIRED_FIELDS = ("id", "source", "prompt", "answer", "reward")
CHOICE_LETTERS = "ABCD"

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MCQ_INSTRUCTION = (
    "Answer with the letter of the correct option. Please reason step by step, and put the letter of your final "
    "answer within \\boxed{}."
)


def math_prompt(question: str) -> str:
    r"""The user message of a math problem: the problem, then the ``\boxed{}`` instruction."""
    return f"{question.strip()}\n\n{MATH_INSTRUCTION}"


def mcq_prompt(question: str, choices: Sequence[str]) -> str:
    """The user message of a multiple-choice question: the question, the options lettered A-D, the instruction."""
    if not 2 <= len(choices) <= len(CHOICE_LETTERS):
        raise ValueError(f"expected 2 to {len(CHOICE_LETTERS)} choices, got {len(choices)}")
    options = "\n".join(
        f"{letter}. {str(choice).strip()}" for letter, choice in zip(CHOICE_LETTERS, choices, strict=False)
    )
    return f"{question.strip()}\n\n{options}\n\n{MCQ_INSTRUCTION}"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(prompt: str, tokenizer) -> str:
    """The text a model sees: the tokenizer's chat template around one user turn (with the generation prompt)
    when the tokenizer has a template, else the prompt itself (plain text)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def encode_prompt(prompt: str, tokenizer) -> list[int]:
    """Token ids of ``render_chat(prompt)``. A chat template carries its own special tokens (none are added);
    plain text gets the tokenizer's usual ones (e.g. BOS)."""
    text = render_chat(prompt, tokenizer)
    ids = tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    return [int(t) for t in ids]


# ---------------------------------------------------------------------------------------------- schema


def check_record(record: dict, where: str) -> dict:
    """Raise ValueError (prefixed with ``where``, e.g. ``file:line``) unless ``record`` is a prompt record."""
    for key in REQUIRED_FIELDS:
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: field {key!r} must be a non-empty string")
    check_reward(record["reward"], record["answer"], where)
    if "meta" in record and not isinstance(record["meta"], dict):
        raise ValueError(f"{where}: field 'meta' must be an object")
    return record


def check_reward(reward: object, answer: str, where: str) -> None:
    """Raise ValueError (prefixed with ``where``) unless ``reward`` is one of ``REWARD_KINDS`` and, for ``mcq``, the
    answer is one letter of ``CHOICE_LETTERS``."""
    if reward not in REWARD_KINDS:
        raise ValueError(f"{where}: reward must be one of {REWARD_KINDS}, got {reward!r}")
    if reward == "mcq" and (len(answer) != 1 or answer not in CHOICE_LETTERS):
        raise ValueError(f"{where}: an mcq answer must be one letter of {CHOICE_LETTERS}, got {answer!r}")


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Prompt records of a prepared jsonl file, each checked (errors name ``file:line``); ids must be unique."""
    records, seen = [], {}
    for where, record in iter_jsonl(path):
        check_record(record, where)
        if record["id"] in seen:
            raise ValueError(f"{where}: duplicate id {record['id']!r} (first at {seen[record['id']]})")
        seen[record["id"]] = where
        records.append(record)
    if not records:
        raise ValueError(f"{os.fspath(path)}: no records")
    return records


def read_training_prompts(path: str | os.PathLike, tokenizer, default_reward: str = "math") -> list[dict]:
    """The GRPO trainer's records of a prompt jsonl file: ``{"prompt_ids": [...], "answer": (reward, gold)}``.

    Lines need ``prompt`` and ``answer`` (strings); ``reward`` (``math`` or ``mcq``) is optional and defaults to
    ``default_reward``. The reward kind travels with the answer, so a data set that mixes math and multiple-choice
    records is graded per record (``rewards.score_by_kind``).

    Raises:
        ValueError: ``file:line`` and the reason, or a file without records.
    """
    out = []
    for where, record in iter_jsonl(path):
        for key in ("prompt", "answer"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"{where}: field {key!r} must be a string")
        reward = record.get("reward", default_reward)
        check_reward(reward, record["answer"], where)
        out.append({"prompt_ids": encode_prompt(record["prompt"], tokenizer), "answer": (reward, record["answer"])})
    if not out:
        raise ValueError(f"{os.fspath(path)}: no records")
    return out


def write_prompts(records: Iterable[dict], path: str | os.PathLike) -> int:
    """Write prompt records as jsonl (parent directories created); returns how many."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            check_record(record, f"{path}: record {count}")
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


_SPACE = re.compile(r"\s+")


def normalise_prompt(text: str) -> str:
    """The text duplicates are detected on: lowercased, whitespace collapsed, ends stripped."""
    return _SPACE.sub(" ", text).strip().lower()

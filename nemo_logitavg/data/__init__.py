"""Datasets: jsonl readers with validation that names the file and line, benchmark loaders and prompt templates."""

from nemo_logitavg.data.jsonl import iter_jsonl, read_jsonl
from nemo_logitavg.data.loaders import (
    DATASETS,
    LoadStats,
    cn_k12_record,
    convert,
    dedupe,
    gsm8k_answer,
    gsm8k_record,
    hash_fraction,
    load_jsonl_dataset,
    math_record,
    mmlu_record,
    record_id,
    split_by_hash,
)
from nemo_logitavg.data.prompts import (
    check_record,
    encode_prompt,
    math_prompt,
    mcq_prompt,
    normalise_prompt,
    read_prompts,
    render_chat,
    write_prompts,
)

__all__ = [
    "DATASETS",
    "LoadStats",
    "check_record",
    "cn_k12_record",
    "convert",
    "dedupe",
    "encode_prompt",
    "gsm8k_answer",
    "gsm8k_record",
    "hash_fraction",
    "iter_jsonl",
    "load_jsonl_dataset",
    "math_prompt",
    "math_record",
    "mcq_prompt",
    "mmlu_record",
    "normalise_prompt",
    "read_jsonl",
    "read_prompts",
    "record_id",
    "render_chat",
    "split_by_hash",
    "write_prompts",
]

"""Datasets: jsonl readers with validation that names the file and line."""

from nemo_logitavg.data.jsonl import read_jsonl

__all__ = ["read_jsonl"]

"""jsonl reading with errors that name the file and line."""

from __future__ import annotations

import pytest

from nemo_logitavg.data import read_jsonl


def test_reads_records(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1", "response": "2"}\n\n{"prompt": "2+2", "response": "4"}\n')
    assert [r["response"] for r in read_jsonl(path, required=("prompt", "response"))] == ["2", "4"]


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n', r"d\.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "response": "b"}\n[1, 2]\n', r"d\.jsonl:2: expected a JSON object"),
        ('{"prompt": "a", "response": 3}\n', r"d\.jsonl:1: field 'response' must be a string"),
        ("\n\n", r"d\.jsonl: no records"),
    ],
)
def test_errors_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_jsonl(path, required=("prompt", "response"))

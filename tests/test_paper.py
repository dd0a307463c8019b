"""The reproduction job (configs/paper_cpu.yaml): the generated multiple-choice task, per-record reward dispatch,
the config, and (slow) the job shrunk to 2 training seeds and 2 ref_weights end to end."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from scipy import stats

from nemo_logitavg import job
from nemo_logitavg.data import check_record, mmlu_record, read_jsonl, read_prompts
from nemo_logitavg.data.prompts import CHOICE_LETTERS, read_training_prompts
from nemo_logitavg.data.synthetic import GENERATORS, make_problems, multiple_choice
from nemo_logitavg.evaluation.job_report import BENCHMARKS
from nemo_logitavg.rewards import extract_last_boxed, score_by_kind, score_math, score_mcq

ROOT = Path(__file__).resolve().parent.parent
TINY_CPU = ROOT / "configs" / "tiny_cpu.yaml"


def _option_value(choice: str) -> str:
    return choice.strip("$ ")


CHECK = re.compile(r"(?P<letter>[A-D]) (?P<option>.+?) = (?P<value>.+?) (?P<says>yes|no)")


def _assert_checks_options(demonstration: str, values: list[str], reached: str) -> None:
    """The demonstration checks the options from A on, each option's value beside the value it reached, says "no"
    until that value's option and "yes" there (and only there), then answers that option's letter."""
    checks = demonstration.split("Check the options: ", 1)[1].split(". The answer is", 1)[0].split(", ")
    found = values.index(reached)
    assert len(checks) == found + 1
    for i, check in enumerate(checks):
        m = CHECK.fullmatch(check)
        assert m, check
        assert (m["letter"], _option_value(m["option"]), _option_value(m["value"])) == (CHOICE_LETTERS[i], values[i],
                                                                                         reached)  # fmt: skip
        assert m["says"] == ("yes" if values[i] == reached else "no")
    assert extract_last_boxed(demonstration) == CHOICE_LETTERS[found]


def test_multiple_choice_options_letters_and_demonstrations():
    problems = make_problems(2000, seed=5, kinds=tuple(GENERATORS))
    letters = Counter()
    for i, problem in enumerate(problems):
        mcq = multiple_choice(problem, random.Random(i))
        assert mcq == multiple_choice(problem, random.Random(i))  # fixed by the record's rng
        values = [_option_value(c) for c in mcq["choices"]]
        right = extract_last_boxed(problem["solution"])
        # Four distinct options, the right value at the gold index, three of the problem's plausible wrong values.
        assert len(set(values)) == 4 and values[mcq["answer"]] == right
        assert set(values) - {right} <= set(problem["distractors"])
        record = check_record(mmlu_record(mcq, f"problem {i}", source="arith_mcq"), f"problem {i}")
        assert (record["reward"], record["source"], record["meta"]["type"]) == ("mcq", "arith_mcq", problem["type"])
        assert record["answer"] == CHOICE_LETTERS[mcq["answer"]]
        letters[record["answer"]] += 1
        # The demonstration ends in the right letter, the careless teacher's in the letter of its wrong value.
        assert score_mcq([mcq["solution"]], [record["answer"]]) == [1.0]
        _assert_checks_options(mcq["solution"], values, right)
        if "flawed_solution" in problem:
            teacher = extract_last_boxed(problem["flawed_solution"])
            assert teacher in values and teacher != right
            _assert_checks_options(mcq["flawed_solution"], values, teacher)
            assert score_mcq([mcq["flawed_solution"]], [CHOICE_LETTERS[values.index(teacher)]]) == [1.0]
            assert score_mcq([mcq["flawed_solution"]], [record["answer"]]) == [0.0]
    # The right letter is uniform over A-D (chi-square goodness of fit).
    assert stats.chisquare([letters[c] for c in CHOICE_LETTERS]).pvalue > 1e-3, letters


def test_score_by_kind_grades_each_record_by_its_own_reward():
    completions = ["so $\\boxed{7}$", "The correct option is B.", "Answer: C", "$\\boxed{\\frac{1}{2}}$",
                   "$\\boxed{B}$"]
    golds = ["7", "B", "D", "0.5", "B"]
    kinds = ["math", "mcq", "mcq", "math", "mcq"]
    one = {"math": score_math, "mcq": score_mcq}
    expected = [one[k]([text], [gold])[0] for text, gold, k in zip(completions, golds, kinds, strict=True)]
    assert expected == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert score_by_kind(completions, golds, kinds) == expected
    # Graded by one reward for the whole batch, a mixed batch comes out wrong either way.
    assert score_math(completions, golds) != expected
    with pytest.raises(ValueError, match="unknown reward kinds \\['gsm'\\]"):
        score_by_kind(["x"], ["1"], ["gsm"])
    with pytest.raises(ValueError, match="2 completions, 1 gold answers, 2 kinds"):
        score_by_kind(["x", "y"], ["1"], ["math", "math"])


def test_training_prompts_carry_their_reward_and_name_bad_lines(tmp_path):
    from transformers import AutoTokenizer

    from tests.tiny_models import save_char_tokenizer

    save_char_tokenizer(str(tmp_path / "tok"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "a or b?", "answer": "B", "reward": "mcq"}\n')
    records = read_training_prompts(path, tokenizer)
    assert [r["answer"] for r in records] == [("math", "2"), ("mcq", "B")]
    assert records[0]["prompt_ids"] == tokenizer("1+1=")["input_ids"]
    path.write_text('{"prompt": "a or b?", "answer": "B"}\n')  # no reward field: the default
    assert read_training_prompts(path, tokenizer, default_reward="mcq")[0]["answer"] == ("mcq", "B")
    for line, message in (
        ('{"prompt": "q", "answer": "B", "reward": "gsm"}', r"train\.jsonl:2: reward must be one of"),
        ('{"prompt": "q", "answer": "E", "reward": "mcq"}', r"train\.jsonl:2: an mcq answer must be one letter"),
        ('{"prompt": "q", "answer": 3}', r"train\.jsonl:2: field 'answer' must be a string"),
    ):
        path.write_text('{"prompt": "1+1=", "answer": "2"}\n' + line + "\n")
        with pytest.raises(ValueError, match=message):
            read_training_prompts(path, tokenizer)


def test_data_phase_mixes_multiple_choice_for_sft_and_grpo(tmp_path):
    overrides = [f"dir={tmp_path}/run", "problems.count=800", "problems.test_size=60", "problems.mcq_fraction=0.5"]
    p = job.plan(str(TINY_CPU), overrides)
    job.make_data(p)
    train, test = read_prompts(p.path("data", "train.jsonl")), read_prompts(p.path("data", "test.jsonl"))
    sft = read_jsonl(p.path("data", "sft.jsonl"))
    assert [s["prompt"] for s in sft] == [r["prompt"] for r in train]
    for split in (train, test):
        kinds = Counter((r["reward"], r["source"]) for r in split)
        assert set(kinds) == {("math", "arith"), ("mcq", "arith_mcq")}
    share = sum(r["reward"] == "mcq" for r in train) / len(train)
    assert 0.35 < share < 0.75  # half of the generated problems; multiple-choice prompts repeat less often
    # Every demonstration is graded by its record's own reward: 1 unless the careless teacher wrote it (algebra).
    scores = score_by_kind([s["response"] for s in sft], [r["answer"] for r in train], [r["reward"] for r in train])
    wrong = [r for r, score in zip(train, scores, strict=True) if score == 0.0]
    assert wrong and all(r["prompt"].startswith("Solve for") for r in wrong)
    assert {r["reward"] for r in wrong} == {"math", "mcq"}
    # The main job keeps its data: no multiple choice unless asked for.
    assert job.plan(str(TINY_CPU)).cfg.problems.mcq_fraction == 0.0
    with pytest.raises(ValueError, match=r"problems\.mcq_fraction must lie in \[0, 1\]"):
        job.make_data(job.plan(str(TINY_CPU), [f"dir={tmp_path}/bad", "problems.mcq_fraction=1.5"]))


PAPER_CPU = ROOT / "configs" / "paper_cpu.yaml"


def test_paper_config_plans_seeds_by_methods_with_one_budget():
    p = job.plan(str(PAPER_CPU))
    seeds, weights = p.cfg.seeds, p.cfg.ref_weight_sweep.ref_weights
    assert len(seeds) >= 3 and sorted(weights) == [0.25, 0.5, 0.75]
    assert p.method_names == [f"logit_avg_a{a:g}" for a in weights] + ["kl"]
    assert len(p.methods) == len(seeds) * 4 and len({c.run.dir for c in p.methods.values()}) == len(p.methods)
    first = next(iter(p.methods.values()))
    for name, cfg in p.methods.items():
        run = p.runs[name]
        assert name == f"{run.method}_seed{run.seed}" and cfg.run.seed == run.seed  # the training seed
        assert cfg.run.dir == p.path("grpo", run.method, f"seed{run.seed}")
        a, beta = (0.0, 0.05) if run.method == "kl" else (float(run.method.rsplit("_a", 1)[1]), 0.0)
        assert (cfg.algorithm.ref_weight, cfg.algorithm.beta) == (a, beta)
        # Same budget, group size, reward, data and start point for every run: only the objective and seed differ.
        for section in ("rollout", "optim", "model", "data"):
            assert getattr(cfg, section) == getattr(first, section)
        assert (cfg.run.steps, cfg.algorithm.group_size) == (first.run.steps, first.algorithm.group_size)
    assert first.model.policy == p.sft.out and first.model.tensor_parallel * p.cfg.concurrent_runs <= p.cfg.nproc
    # Seed-major: a job stopped half-way has every method of its first seeds.
    assert [p.runs[n].seed for n in p.methods] == sorted(p.runs[n].seed for n in p.methods)
    assert p.cfg.problems.mcq_fraction > 0 and p.cfg.eval.sampled_k == 0
    # The main job is planned as before: one run per method, in grpo/<method>, with grpo.run.seed.
    tiny = job.plan(str(TINY_CPU))
    assert list(tiny.methods) == ["logit_avg", "kl"] and tiny.cfg.concurrent_runs == 1
    assert tiny.methods["kl"].run.dir == tiny.path("grpo", "kl") and tiny.runs["kl"].seed is None


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["ref_weight_sweep.method=nope"], r"paper_cpu\.yaml: ref_weight_sweep\.method 'nope' is not one of"),
        (["ref_weight_sweep.ref_weights=[0.5,0.5]"], r"ref_weight_sweep\.ref_weights must be non-empty and distinct"),
        (["ref_weight_sweep.ref_weights=[0.5,1.5]"], r"methods\.logit_avg at ref_weight_sweep.ref_weights 1\.5.*"
                                                     r"algorithm\.ref_weight"),
        (["seeds=[1,1]"], r"seeds: repeated training seeds"),
        (["concurrent_runs=3"], r"concurrent_runs \(3\) must be >= 1 and divide nproc \(2\)"),
        (["grpo.model.tensor_parallel=2"], r"model\.tensor_parallel x model\.pipeline_parallel \(2 x 1\) must "
                                           r"divide the 1 processes"),
        (["methods.kl.algorithm.bta=1"], r"methods\.kl.*bta"),
    ],
)  # fmt: skip
def test_bad_paper_config_names_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        job.plan(str(PAPER_CPU), overrides)


def test_concurrent_phases_overlap_and_a_failure_stops_the_rest():
    import threading

    both = threading.Barrier(2, timeout=30)  # passes only if two jobs are running at the same time
    ran = []
    job._run_concurrently([lambda: ran.append(both.wait()), lambda: ran.append(both.wait())], workers=2)
    assert sorted(ran) == [0, 1]

    def fail() -> None:
        raise RuntimeError("GRPO x failed")

    started = []
    with pytest.raises(RuntimeError, match="GRPO x failed"):
        job._run_concurrently([fail, lambda: started.append(1)], workers=1)
    assert started == []  # not started after the failure (a rerun resumes it)


def test_score_records_grades_by_record_and_measures_letter_adherence():
    from nemo_logitavg.evaluation import score_records, summarize
    from nemo_logitavg.rollout.client import Completion

    records = [
        {"id": "m1", "source": "arith", "answer": "7", "reward": "math"},
        {"id": "q1", "source": "arith_mcq", "answer": "B", "reward": "mcq"},
        {"id": "q2", "source": "arith_mcq", "answer": "C", "reward": "mcq"},
    ]
    texts = [["so $\\boxed{7}$"], ["The correct option is B.", "$\\boxed{A}$"], ["no idea", "I think so"]]
    completions = [[Completion([1, 2], [0.0, 0.0], t, "stop", policy_step=0) for t in group]
                   for group in texts]  # fmt: skip
    rows = score_records(records, completions, math_timeout=10.0)
    assert [r["rewards"] for r in rows] == [[1.0], [1.0, 0.0], [0.0, 0.0]]
    assert "letter_answer" not in rows[0] and [r["letter_answer"] for r in rows[1:]] == [[True, True], [False, False]]
    assert summarize(rows[1:], 100)["letter_answer"] == 0.5 and "letter_answer" not in summarize(rows[:1], 100)


def _summary(accuracy: float) -> dict:
    return {"accuracy": accuracy, "has_boxed": 1.0, "boxed_latex_valid": 0.9, "ended_by_eos": 1.0}


def test_reproduction_rows_match_scipy():
    from nemo_logitavg.evaluation import reproduction

    acc = {"la_a0.5": {1: 0.62, 2: 0.70, 3: 0.66}, "la_a0.25": {1: 0.60, 2: 0.61, 3: 0.69},
           "kl": {1: 0.58, 2: 0.64, 3: 0.63}}
    per_seed = {"b": {m: {s: _summary(a) for s, a in v.items()} for m, v in acc.items()}}
    sft = {"b": _summary(0.55)}
    across = {r["method"]: r for r in reproduction.across_seed_rows(per_seed, sft, {})}
    for method, values in acc.items():
        x = [values[s] for s in sorted(values)]
        low, high = stats.t.interval(0.95, len(x) - 1, loc=sum(x) / 3, scale=stats.sem(x))
        assert (across[method]["t_low"], across[method]["t_high"]) == pytest.approx((low, high), abs=1e-9)
    paired = {(r["method"], r["against"]): r for r in reproduction.paired_rows(per_seed, sft, "kl", {})}
    assert set(paired) == {(m, ref) for m in acc for ref in ("sft", "kl") if m != ref}
    for (method, against), row in paired.items():
        a = [acc[method][s] for s in (1, 2, 3)]
        b = [acc[against][s] for s in (1, 2, 3)] if against == "kl" else [0.55] * 3
        ci = stats.ttest_rel(a, b).confidence_interval(0.95)
        assert (row["t_low"], row["t_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
        sd = stats.tstd([x - y for x, y in zip(a, b, strict=True)])
        mdd = (stats.t.ppf(0.975, 2) + stats.t.ppf(0.8, 2)) * sd / 3**0.5
        assert row["detectable"] == pytest.approx(mdd, rel=1e-9)
        assert row["verdict"] == ("above" if ci.low > 0 else "below" if ci.high < 0 else "within CI")


# ------------------------------------------------------------------------------------------------ end to end

PAPER_SMALL = [
    "problems.count=1500", "problems.test_size=40", "problems.curve_size=6",
    "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2", "model.vocab_size=160",
    "sft.steps=150", "sft.sequences_per_step=8", "sft.micro_batch_size=8", "sft.lr=1e-2", "sft.checkpoint_every=0",
    "seeds=[1,2]", "ref_weight_sweep.ref_weights=[0.25,0.75]",
    "grpo.run.steps=2", "grpo.run.checkpoint_every=2", "grpo.run.eval_every=2",
    "grpo.rollout.prompts_per_step=2", "grpo.algorithm.group_size=4", "grpo.train.micro_batch_size=4",
]  # fmt: skip


def _run_paper(run_dir: Path, log: Path) -> str:
    import subprocess
    import sys

    command = [sys.executable, str(ROOT / "recipes" / "job.py"), "--config", str(PAPER_CPU), f"dir={run_dir}",
               *PAPER_SMALL]  # fmt: skip
    with log.open("a") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=1200).returncode
    text = log.read_text()
    assert code == 0, text[-4000:]
    return text


@pytest.mark.slow
def test_paper_job_shrunk_end_to_end(tmp_path):
    from nemo_logitavg.rewards import extract_choice

    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    _run_paper(run_dir, log)
    report = run_dir / "report"
    text = (report / "report.md").read_text()
    figures = json.loads((report / "seeds.json").read_text())
    methods = ["logit_avg_a0.25", "logit_avg_a0.75", "kl"]
    assert set(figures["per_seed"]) == {"arith", "arith_mcq", "all"}

    # The per-seed figures are each run's own evaluation: greedy accuracy of its samples, graded here again,
    # the multiple-choice ones by score_mcq against the gold letters.
    letters_seen = 0
    for method in methods:
        for seed in (1, 2):
            samples = read_jsonl(run_dir / "eval" / f"{method}_seed{seed}" / "samples.jsonl")
            for benchmark, grade in (("arith", None), ("arith_mcq", score_mcq)):
                rows = [r for r in samples if r["source"] == benchmark]
                assert rows and all(r["mode"] == "greedy" for r in rows)
                if grade is not None:
                    texts = [r["completions"][0] for r in rows]
                    assert [r["rewards"][0] for r in rows] == grade(texts, [r["answer"] for r in rows])
                    letters = [extract_choice(t) is not None for t in texts]
                    letters_seen += sum(letters)
                    summary = figures["per_seed"][benchmark][method][str(seed)]
                    assert summary["letter_answer"] == pytest.approx(sum(letters) / len(letters))
                accuracy = figures["per_seed"][benchmark][method][str(seed)]["accuracy"]
                assert accuracy == pytest.approx(sum(r["score"] for r in rows) / len(rows))
            overall = figures["per_seed"]["all"][method][str(seed)]["accuracy"]
            assert overall == pytest.approx(sum(r["score"] for r in samples) / len(samples))
    assert letters_seen > 0  # the SFT model learned to answer with a letter: the grading above has teeth

    # The across-seed interval, recomputed from the per-seed figures with scipy; the paired difference to KL-GRPO.
    across = {(r["benchmark"], r["method"]): r for r in figures["across_seeds"]}
    paired = {(r["benchmark"], r["method"], r["against"]): r for r in figures["paired"]}
    for benchmark, label in BENCHMARKS.items():
        per_seed = {m: [figures["per_seed"][benchmark][m][s]["accuracy"] for s in ("1", "2")] for m in methods}
        for method, x in per_seed.items():
            mean = sum(x) / 2
            low, high = stats.t.interval(0.95, 1, loc=mean, scale=stats.sem(x)) if x[0] != x[1] else (mean, mean)
            assert (across[label, method]["t_low"], across[label, method]["t_high"]) == pytest.approx((low, high))
            if method != "kl":
                d = [a - b for a, b in zip(x, per_seed["kl"], strict=True)]
                mean_d = sum(d) / 2
                low, high = (stats.t.interval(0.95, 1, loc=mean_d, scale=stats.sem(d)) if d[0] != d[1]
                             else (mean_d, mean_d))  # fmt: skip
                assert (paired[label, method, "kl"]["t_low"], paired[label, method, "kl"]["t_high"]) == \
                    pytest.approx((low, high))  # fmt: skip
            assert f"| {label} | {method} | 2 |" in text
    for section in ("Accuracy across training seeds", "Paired differences across seeds", "detectable",
                    "letter_answer", "boxed_latex_valid", "has_boxed", "Per seed: MMLU-style", "Exact config"):
        assert section in text
    # The ablation plots: accuracy against ref_weight per benchmark, in the report.
    for benchmark in ("arith", "arith_mcq", "all"):
        assert (report / f"ablation_{benchmark}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![ablation_{benchmark}.png](ablation_{benchmark}.png)" in text
    # One SFT model; each (method, seed) its own GRPO run with run.seed = the training seed.
    from omegaconf import OmegaConf

    for method in methods:
        for seed in (1, 2):
            config = OmegaConf.load(run_dir / "configs" / f"grpo_{method}_seed{seed}.yaml")
            assert config.run.seed == seed and config.model.policy == str(run_dir / "models" / "sft")
            assert (run_dir / "grpo" / method / f"seed{seed}" / "policy_final" / "config.json").exists()

    # A rerun finds every (method, seed) finished and skips it.
    before = len(log.read_text())
    rerun = _run_paper(run_dir, log)[before:]
    for method in methods:
        for seed in (1, 2):
            assert f"grpo {method}_seed{seed}: done earlier, skipped" in rerun


def test_tables_keep_a_metric_that_only_some_rows_have():
    from nemo_logitavg.evaluation import csv_text, markdown_table

    rows = [{"model": "a", "accuracy": 0.5}, {"model": "b", "accuracy": 0.25, "letter_answer": 1.0}]
    assert csv_text(rows) == "model,accuracy,letter_answer\na,0.5,\nb,0.25,1.0\n"
    assert markdown_table(rows).splitlines()[3] == "| b | 0.2500 | 1.0000 |"

"""The main job's parts: generated MATH-format problems, the from-scratch tokenizer and model, the job config, the
training command line, and (slow) the whole job end to end, killed mid-run and resumed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_logitavg import job
from nemo_logitavg.data.loaders import math_record
from nemo_logitavg.data.prompts import math_prompt
from nemo_logitavg.data.synthetic import GENERATORS, make_problems

ROOT = Path(__file__).resolve().parent.parent
TINY_CPU = ROOT / "configs" / "tiny_cpu.yaml"


def test_problems_are_math_format_and_graded_correct_by_math_verify():
    from nemo_logitavg.rewards import score_math

    problems = make_problems(60, seed=3, kinds=tuple(GENERATORS))
    assert make_problems(60, seed=3, kinds=tuple(GENERATORS)) == problems  # fixed by the seed
    assert {p["type"] for p in problems} == {"Addition", "Subtraction", "Multiplication", "Algebra", "Fractions"}
    records = [math_record(p, f"problem {i}", source="arith") for i, p in enumerate(problems)]
    # The worked solution is right: math-verify grades it 1 against the gold the MATH loader extracted, and a
    # solution of another problem with another (integer) answer 0.
    assert score_math([p["solution"] for p in problems], [r["answer"] for r in records]) == [1.0] * len(problems)
    golds = [r["answer"] for r in records]
    wrong = [(p["solution"], gold) for p, own, gold in zip(problems[1:], golds[1:], golds, strict=False)
             if own.isdigit() and gold.isdigit() and own != gold]  # fmt: skip
    assert wrong and score_math(*map(list, zip(*wrong, strict=True))) == [0.0] * len(wrong)


def test_arithmetic_in_solutions_is_correct():
    for p in make_problems(400, seed=0):
        left, right = p["solution"].split("$")[1].split("=")[:2]
        if p["type"] in ("Addition", "Subtraction", "Multiplication"):
            assert eval(left.replace("\\times", "*")) == int(right)  # noqa: S307 - generated digits and operators
        if p["type"] == "Algebra":  # x + b = c solved as x = c - b; the teacher's flaw: x = c + b
            equation, work = p["problem"].split("$")[3], p["solution"].split("$")[1]
            (b, c), (diff, x) = map(int, equation.split("+")[1].split("=")), work.split("=")[1:]
            assert eval(diff) == int(x) == c - b  # noqa: S307
            assert f"= {c} + {b} = {c + b} $" in p["flawed_solution"] and "- " not in p["flawed_solution"]


def test_unknown_problem_kind_is_refused():
    with pytest.raises(ValueError, match="unknown problem kinds.*geometry"):
        make_problems(4, seed=0, kinds=("addition", "geometry"))


def test_tokenizer_from_scratch_round_trips_and_splits_digits(tmp_path):
    from transformers import AutoTokenizer

    from nemo_logitavg.models.scratch import BOS_ID, EOS_ID, train_tokenizer

    problems = make_problems(300, seed=1)
    texts = [math_prompt(p["problem"]) + "\n" + p["solution"] for p in problems]  # as the job trains it
    train_tokenizer(texts, str(tmp_path), vocab_size=200)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (BOS_ID, EOS_ID, 200)
    for text in texts[:50] + ["Solve for $x$: $ 3x + 12 = 27 $.\n\nPlease reason step by step."]:
        ids = tok(text)["input_ids"]
        assert ids[0] == BOS_ID and tok.decode(ids, skip_special_tokens=True) == text
    pieces = tok.convert_ids_to_tokens(tok("1234 + 56", add_special_tokens=False)["input_ids"])
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("123456")


def test_init_model_loads_in_transformers_and_megatron_builder(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.scratch import ScratchModelConfig, init_llama

    shape = ScratchModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    init_llama(str(tmp_path), shape, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 2 and model.dtype == torch.float32
    cfg = LlamaConfig.from_hf(str(tmp_path))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_key_value_heads) == (64, 32, 2)


def test_shipped_config_plans_every_phase():
    p = job.plan(str(TINY_CPU))
    assert set(p.methods) == {"logit_avg", "kl"}
    la, kl = p.methods["logit_avg"], p.methods["kl"]
    assert (la.algorithm.ref_weight, la.algorithm.beta) == (0.5, 0.0)
    assert (kl.algorithm.ref_weight, kl.algorithm.beta) == (0.0, 0.05)
    # The same budget for both methods: everything but the objective is equal.
    for section in ("rollout", "train", "optim", "model"):
        assert getattr(la, section) == getattr(kl, section)
    assert (la.run.steps, la.algorithm.group_size) == (kl.run.steps, kl.algorithm.group_size)
    assert la.model.tensor_parallel == 2 and p.cfg.nproc == 2
    assert la.model.policy == p.sft.out and p.sft.model.endswith("init")
    assert len(p.cfg.eval.seeds) >= 3


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["sft.stpes=3"], r"tiny_cpu\.yaml: sft\.stpes"),
        (["methods.kl.algorithm.bta=1"], r"methods\.kl.*bta"),
        (["methods.logit_avg.algorithm.ref_weight=1.5"], r"methods\.logit_avg.*algorithm\.ref_weight"),
        (["grpo.train.micro_batch_size=5"], r"methods\.logit_avg.*train\.micro_batch_size \(5\)"),
        # the keys that moved out of the rollout section: refused with their new place
        (
            ["grpo.rollout.micro_batch_size=5"],
            r"tiny_cpu\.yaml: methods\.logit_avg: rollout\.micro_batch_size moved to train\.micro_batch_size \(it ",
        ),
        (
            ["methods.kl.rollout.max_tokens_per_micro_batch=4096"],
            r"methods\.kl: rollout\.max_tokens_per_micro_batch moved to train\.max_tokens_per_micro_batch",
        ),
        (["baseline=kl"], r"baseline 'kl'"),
        (["problems.sede=1"], r"problems\.sede"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        job.plan(str(TINY_CPU), overrides)


def test_rerun_with_another_config_is_refused(tmp_path):
    p = job.plan(str(TINY_CPU), [f"dir={tmp_path}/run"])
    job.check_run_dir(p, str(TINY_CPU))
    job.check_run_dir(job.plan(str(TINY_CPU), [f"dir={tmp_path}/run"]), str(TINY_CPU))  # same: fine
    with pytest.raises(ValueError, match="different config"):
        job.check_run_dir(job.plan(str(TINY_CPU), [f"dir={tmp_path}/run", "sft.steps=7"]), str(TINY_CPU))


def test_training_runs_as_a_library_module_under_torchrun():
    """SFT and GRPO run as ``torchrun -m nemo_logitavg.trainer.main {sft,grpo} CONFIG``: modules of the installed
    package, never files of recipes/ by path."""
    command = job.torchrun_command("grpo", "/run/configs/grpo_kl.yaml", nproc=2, port=29511)
    assert command == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                       "--master-addr", "127.0.0.1", "--master-port", "29511",
                       "-m", "nemo_logitavg.trainer.main", "grpo", "/run/configs/grpo_kl.yaml"]  # fmt: skip
    assert job.torchrun_command("sft", "sft.yaml", nproc=1, port=1)[-3:] == ["nemo_logitavg.trainer.main", "sft",
                                                                              "sft.yaml"]  # fmt: skip
    assert not any("recipes" in part for part in command)


def test_data_phase_splits_held_out_problems(tmp_path):
    from nemo_logitavg.data import read_jsonl, read_prompts

    p = job.plan(str(TINY_CPU), [f"dir={tmp_path}/run", "problems.count=600", "problems.test_size=40"])
    job.make_data(p)
    train, test = read_prompts(p.path("data", "train.jsonl")), read_prompts(p.path("data", "test.jsonl"))
    sft = read_jsonl(p.path("data", "sft.jsonl"))
    assert len(test) == 40 and len(sft) == len(train) > 300
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert [s["prompt"] for s in sft] == [r["prompt"] for r in train]
    # Every solution ends in \boxed{}; the careless teacher's (algebra only, at the configured rate) add b.
    correct = [s["response"].endswith(f"\\boxed{{{r['answer']}}}$.") for s, r in zip(sft, train, strict=True)]
    assert all(s["response"].endswith("}$.") and "\\boxed{" in s["response"] for s in sft)
    flawed = [s for s, ok in zip(sft, correct, strict=True) if not ok]
    algebra = [s for s in sft if s["prompt"].startswith("Solve for")]
    assert all(s in algebra and " + " in s["response"] and " - " not in s["response"] for s in flawed)
    rate = p.cfg.problems.teacher_error_rate
    assert abs(len(flawed) / len(algebra) - rate) < 0.12 and (rate == 0) == (not flawed)
    assert read_prompts(p.path("data", "curve.jsonl")) == test[: p.cfg.problems.curve_size]


# ------------------------------------------------------------------------------------------------ end to end

SMALL = [
    "problems.count=1500", "problems.test_size=24", "problems.curve_size=8",
    "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2", "model.vocab_size=160",
    "sft.steps=12", "sft.sequences_per_step=16", "sft.micro_batch_size=8", "sft.checkpoint_every=4",
    "grpo.run.steps=6", "grpo.run.checkpoint_every=2", "grpo.run.eval_every=2",
    "grpo.rollout.prompts_per_step=2", "grpo.algorithm.group_size=4", "grpo.train.micro_batch_size=4",
    "grpo.rollout.max_tokens=24", "eval.max_tokens=24", "eval.sampled_k=1",
]  # fmt: skip


def _job(run_dir: Path, log: Path) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "recipes" / "job.py"), "--config", str(TINY_CPU),
               f"dir={run_dir}", *SMALL]  # fmt: skip
    # Its own session, so the test can kill the whole job (the job, torchrun, trainer ranks, rollout server).
    return subprocess.Popen(command, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_job_end_to_end_killed_mid_grpo_then_resumed(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    proc = _job(run_dir, log)
    metrics = run_dir / "grpo" / "logit_avg" / "metrics.jsonl"
    deadline = time.monotonic() + 900
    # Kill everything, hard, once the first GRPO method has checkpointed step 2 and logged step 3 (six steps: a
    # GRPO step no longer writes the policy to disk, so a short run could finish inside one poll).
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, log.read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    assert not (run_dir / "report").exists()

    first_log = log.read_text()
    proc = _job(run_dir, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    rerun = log.read_text()[len(first_log) :]
    # The rerun skipped what was done and resumed GRPO from its checkpoint instead of starting over.
    for phase in ("data", "init model", "sft"):
        assert f"{phase}: done earlier, skipped" in rerun
    resumed = re.search(r"\[grpo\] resumed from .* \(step (\d+)\)", rerun)
    assert resumed and int(resumed.group(1)) in (2, 4), rerun[-3000:]  # its last checkpoint before the kill
    assert "[sft] step" not in rerun

    report = run_dir / "report"
    text = (report / "report.md").read_text()
    for expected in ("paired bootstrap", "has_boxed", "boxed_latex_valid", "mean_length", "reward.png",
                     "accuracy.png", "Exact config", "logit_avg", "kl"):  # fmt: skip
        assert expected in text
    for png in ("reward.png", "accuracy.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((report / "results.json").read_text())
    models = {(row["model"], row["mode"]): row for row in payload["aggregate"]}
    for name in ("sft", "logit_avg", "kl"):
        assert models[(name, "greedy")]["num_problems"] == 24
        assert models[(name, "sampled")]["num_seeds"] == 3
    assert {row["model"] for row in payload["comparison"]} == {"sft", "logit_avg", "kl"}
    # Accuracy by problem type: its per-type figures, weighted by the type counts, give the overall accuracy.
    assert "Accuracy by problem type" in text
    for row in json.loads((report / "accuracy_by_type.json").read_text()):
        counts = {key: int(key.rsplit("(", 1)[1].rstrip(")")) for key in row if key not in ("model", "mode")}
        assert sum(counts.values()) == 24
        overall = sum(row[key] * n for key, n in counts.items()) / 24
        assert abs(overall - models[(row["model"], row["mode"])]["accuracy_mean"]) < 1e-9
    # The logit-averaging model is evaluated as deployed: a pi_mix bundle with the SFT model as reference.
    bundle = json.loads((run_dir / "models" / "logit_avg_bundle" / "config.json").read_text())
    assert bundle["ref_weight"] == 0.5
    # Both GRPO runs reached their last step; the resumed one logged each step once after the resume.
    for name in ("logit_avg", "kl"):
        steps = [json.loads(line)["step"] for line in (run_dir / "grpo" / name / "metrics.jsonl").open()]
        assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
    assert (report / "config.yaml").exists() and (report / "configs" / "grpo_logit_avg.yaml").exists()

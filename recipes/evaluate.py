"""Evaluate models on prepared test prompts: accuracy with 95% bootstrap CIs, format metrics, response length.

    python recipes/evaluate.py --data DIR/math/test.jsonl [--data ...] --out RESULTS_DIR \
        --model sft=SFT_HF_DIR --model kl=KL_HF_DIR --model la0.5=BUNDLE_DIR [--baseline sft] \
        [--seeds 0,1,2] [--sampled-k 4] [--max-tokens 1024] [--policy-alone]

A model is a Hugging Face directory, a Megatron converter checkpoint (converted to HF first) or an averaged-model
bundle (served as pi_mix; ``--policy-alone`` adds its policy half as NAME/policy). Each is served by a rollout
server on 127.0.0.1 that this recipe starts and stops. Greedy (k=1, temperature 0) is the headline; a sampled
mode (``--sampled-k`` completions at ``--sampled-temperature``) runs once per seed. ``--results`` adds runs from
earlier results.json files to the report (e.g. to compare evaluations made separately). Writes results.md/.csv/.json,
runs.csv, samples.jsonl and, with ``--baseline``, comparison.md/.csv (paired-bootstrap CI of the difference).
"""

from __future__ import annotations

import argparse
import logging
import os

from nemo_logitavg import evaluation
from nemo_logitavg.data import read_prompts
from nemo_logitavg.models.bundle import is_bundle


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", default=[], help="prepared test jsonl (repeatable)")
    parser.add_argument("--model", action="append", default=[], help="NAME=PATH (repeatable)")
    parser.add_argument("--results", action="append", default=[], help="earlier results.json to include")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--baseline", help="model NAME the others are compared with")
    parser.add_argument("--seeds", default="0", help="comma-separated evaluation seeds (sampled mode)")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--no-greedy", action="store_true", help="skip the greedy (headline) mode")
    parser.add_argument("--sampled-k", type=int, default=0, help="completions per problem when sampling (0: off)")
    parser.add_argument("--sampled-temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--limit", type=int, help="first N problems of each data file")
    parser.add_argument("--policy-alone", action="store_true", help="also evaluate each bundle's policy alone")
    parser.add_argument("--math-timeout", type=float, default=5.0, help="seconds per graded answer")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    parser.add_argument("--server-arg", action="append", default=[], help="extra rollout-server flag (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    records = []
    for path in args.data:
        records += read_prompts(path)[: args.limit]
    modes = [] if args.no_greedy else [evaluation.GREEDY]
    if args.sampled_k > 0:
        modes.append(evaluation.SamplingMode("sampled", args.sampled_k, args.sampled_temperature, args.top_p))
    if args.model and (not records or not modes):
        parser.error("--model needs --data and at least one mode")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    runs = []
    for path in args.results:
        runs += evaluation.runs_from_json(path)
    workdir = os.path.join(args.out, "work")
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep:
            parser.error(f"--model takes NAME=PATH, got {spec!r}")
        targets = [(name, False)]
        if args.policy_alone and is_bundle(path):
            targets.append((f"{name}/policy", True))
        for label, alone in targets:
            runs += evaluation.evaluate_model(
                path, label, records, modes, seeds, args.max_tokens, workdir, policy_alone=alone,
                math_timeout=args.math_timeout, num_resamples=args.resamples, server_args=args.server_arg,
            )  # fmt: skip
    if not runs:
        parser.error("nothing to report: give --model (with --data) or --results")
    payload = evaluation.write_reports(args.out, runs, args.baseline, args.resamples)
    print(evaluation.markdown_table(payload["aggregate"]))
    if payload["comparison"]:
        print(evaluation.markdown_table(payload["comparison"]))
    print(f"wrote {args.out}/results.md, results.csv, results.json")


if __name__ == "__main__":
    main()

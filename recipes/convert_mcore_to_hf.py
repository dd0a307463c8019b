"""Convert a Megatron-Core checkpoint back into a Hugging Face directory, with a model card.

    python recipes/convert_mcore_to_hf.py --ckpt CKPT_DIR --out HF_DIR [--step K] \
        [--config TRAIN.yaml [key=value ...]] [--results REPORT/results.json] [--bundle BUNDLE_DIR]

CKPT_DIR is either a checkpoint of convert_hf_to_mcore.py (meta.json + mp_rank_* shards) or a training
checkpoint of recipes/grpo.py / the trainer (`run.dir/checkpoints`, newest step unless --step; its policy is
exported, with the config and tokenizer of the reference it names). One plain process; vocabulary padding is
stripped; `AutoModelForCausalLM.from_pretrained(HF_DIR)` loads the result.

Release: `--config` is the training config (and the overrides the run had), `--results` an evaluation of
recipes/evaluate.py; both go into the model card (README.md). `--bundle` also writes the averaged model (the
exported policy, the config's reference and its ref_weight) that `from_pretrained(..., trust_remote_code=True)`
loads as pi_mix, with its own card.
"""

from __future__ import annotations

import argparse

from nemo_logitavg.checkpointing import export_checkpoint_to_hf, is_training_checkpoint
from nemo_logitavg.config import GRPOConfig, config_as_dict
from nemo_logitavg.models.bundle import write_bundle
from nemo_logitavg.models.conversion.mcore_checkpoint import convert_mcore_to_hf
from nemo_logitavg.parallel import init_parallel, teardown
from nemo_logitavg.release.model_card import write_model_card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (meta.json + mp_rank_* shards)")
    parser.add_argument("--out", required=True, help="Hugging Face directory to write")
    parser.add_argument("--step", type=int, help="training checkpoints: the step to export (default: latest)")
    parser.add_argument("--config", help="the training config, for the model card (and --bundle)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides the training run had")
    parser.add_argument("--results", help="results.json of recipes/evaluate.py, for the model card")
    parser.add_argument("--bundle", help="also write the averaged model (policy + reference + ref_weight) here")
    args = parser.parse_args(argv)
    cfg = config_as_dict(GRPOConfig, args.config, args.overrides) if args.config else None
    reference = None
    if args.bundle:  # checked before the export, which can take long
        if cfg is None:
            parser.error("--bundle needs --config (the reference and ref_weight come from the training config)")
        reference = cfg["model"]["reference"] or cfg["model"]["policy"]
        if reference == "???" or not cfg["algorithm"]["ref_weight"]:
            parser.error("--bundle needs model.policy (the frozen reference) and ref_weight > 0 in the config")

    if is_training_checkpoint(args.ckpt):
        init_parallel()
        try:
            source = export_checkpoint_to_hf(args.ckpt, args.out, args.step)
        finally:
            teardown()
        print(f"wrote {args.out}: the policy of {source}")
    else:
        model_cfg = convert_mcore_to_hf(args.ckpt, args.out)
        print(f"wrote {args.out}: {model_cfg.num_hidden_layers} layers, vocab {model_cfg.vocab_size}")
    write_model_card(args.out, cfg, args.results)
    if args.bundle:
        write_bundle(args.out, reference, cfg["algorithm"]["ref_weight"], args.bundle)
        write_model_card(args.bundle, cfg, args.results)
        print(f"wrote {args.bundle}: pi_mix with ref_weight {cfg['algorithm']['ref_weight']} (reference {reference})")


if __name__ == "__main__":
    main()

"""Convert a Megatron-Core checkpoint back into a Hugging Face directory.

    python recipes/convert_mcore_to_hf.py --ckpt CKPT_DIR --out HF_DIR [--step K]

CKPT_DIR is either a checkpoint of convert_hf_to_mcore.py (meta.json + mp_rank_* shards) or a training
checkpoint of recipes/grpo.py / the trainer (`run.dir/checkpoints`, newest step unless --step; its policy is
exported, with the config and tokenizer of the reference it names). One plain process; vocabulary padding is
stripped; `AutoModelForCausalLM.from_pretrained(HF_DIR)` loads the result.
"""

from __future__ import annotations

import argparse

from nemo_logitavg.checkpointing import export_checkpoint_to_hf, is_training_checkpoint
from nemo_logitavg.models.hf_conversion import convert_mcore_to_hf
from nemo_logitavg.parallel import init_parallel, teardown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (meta.json + mp_rank_* shards)")
    parser.add_argument("--out", required=True, help="Hugging Face directory to write")
    parser.add_argument("--step", type=int, help="training checkpoints: the step to export (default: latest)")
    args = parser.parse_args(argv)
    if is_training_checkpoint(args.ckpt):
        init_parallel()
        try:
            source = export_checkpoint_to_hf(args.ckpt, args.out, args.step)
        finally:
            teardown()
        print(f"wrote {args.out}: the policy of {source}")
        return
    cfg = convert_mcore_to_hf(args.ckpt, args.out)
    print(f"wrote {args.out}: {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}")


if __name__ == "__main__":
    main()

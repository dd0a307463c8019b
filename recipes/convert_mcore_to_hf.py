"""Convert a Megatron-Core checkpoint written by convert_hf_to_mcore.py back into a Hugging Face directory.

    python recipes/convert_mcore_to_hf.py --ckpt CKPT_DIR --out HF_DIR

One plain process: gathers every TP/PP shard, strips the vocabulary padding and writes safetensors,
config.json and the tokenizer files carried in CKPT_DIR/hf/; `AutoModelForCausalLM.from_pretrained(HF_DIR)`
loads the result.
"""

from __future__ import annotations

import argparse

from nemo_logitavg.models.hf_conversion import convert_mcore_to_hf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (meta.json + mp_rank_* shards)")
    parser.add_argument("--out", required=True, help="Hugging Face directory to write")
    args = parser.parse_args(argv)
    cfg = convert_mcore_to_hf(args.ckpt, args.out)
    print(f"wrote {args.out}: {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}")


if __name__ == "__main__":
    main()

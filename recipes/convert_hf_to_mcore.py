"""Convert a Hugging Face Llama directory into a Megatron-Core checkpoint sharded for TP x PP.

    python recipes/convert_hf_to_mcore.py --hf HF_DIR --out CKPT_DIR [--tp N] [--pp M]

One plain process (no torchrun, no torch.distributed): the shards are computed tensor by tensor and written
as CKPT_DIR/mp_rank_{tp:02d}_{pp:03d}/model.pt with CKPT_DIR/meta.json, plus the source's config and
tokenizer files under CKPT_DIR/hf/. `load_mcore_checkpoint` (`nemo_logitavg/models/conversion/mcore_checkpoint.py`)
loads it into a GPTModel at any TP/PP (re-sharding when the layout differs).
"""

from __future__ import annotations

import argparse

from nemo_logitavg.models.conversion.mcore_checkpoint import convert_hf_to_mcore


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, help="Hugging Face directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    args = parser.parse_args(argv)
    cfg = convert_hf_to_mcore(args.hf, args.out, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp)
    print(f"wrote {args.out}: {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, TP={args.tp}, PP={args.pp}")


if __name__ == "__main__":
    main()

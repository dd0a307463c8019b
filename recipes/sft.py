"""Supervised fine-tuning: the SFT model that logit-averaging GRPO keeps as its frozen reference.

    torchrun --nproc-per-node 2 recipes/sft.py --config configs/sft.yaml model=DIR data=train.jsonl out=DIR

`data` is jsonl with one {"prompt": ..., "response": ...} per line; the response (plus EOS) is learned, the
prompt is context. The result is a plain Hugging Face directory. With `checkpoint_every=N` the run checkpoints
into OUT.checkpoints and a rerun of the same command resumes from there.
"""

from __future__ import annotations

import argparse
import os

from nemo_logitavg.config import SFTConfig, load_config
from nemo_logitavg.data import encode_prompt, read_jsonl
from nemo_logitavg.models import LlamaConfig
from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
from nemo_logitavg.models.conversion.streaming import export_model_hf
from nemo_logitavg.parallel import init_parallel, teardown
from nemo_logitavg.sft import train_sft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML config")
    args = parser.parse_args()
    cfg = load_config(SFTConfig, args.config, args.overrides)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    # The prompt is encoded exactly as GRPO and evaluation encode it; the response carries no BOS.
    records = [
        {
            "prompt_ids": encode_prompt(r["prompt"], tokenizer),
            "response_ids": tokenizer(r["response"], add_special_tokens=False)["input_ids"] + eos,
        }
        for r in read_jsonl(cfg.data, required=("prompt", "response"))
    ]
    init_parallel(cfg.tensor_parallel, cfg.pipeline_parallel, seed=cfg.seed)
    model_cfg = LlamaConfig.from_hf(cfg.model)
    actor = LogitAveragingActor(
        model_cfg, None, ActorConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, clip_grad=cfg.clip_grad,
                                     lr_warmup_steps=cfg.warmup_steps, min_lr=cfg.min_lr or 0.0,
                                     lr_decay_steps=cfg.steps if cfg.min_lr is not None else 0)
    )  # fmt: skip
    actor.load_hf(cfg.model, None)
    out = os.path.normpath(cfg.out)
    train_sft(actor, records, cfg.steps, cfg.sequences_per_step, cfg.micro_batch_size,
              log_path=cfg.log or out + ".metrics.jsonl", seed=cfg.seed,
              checkpoint_dir=out + ".checkpoints" if cfg.checkpoint_every else None,
              checkpoint_every=cfg.checkpoint_every)  # fmt: skip
    export_model_hf(actor.gpt_policy, model_cfg, cfg.out, source_dir=cfg.model)
    teardown()


if __name__ == "__main__":
    main()

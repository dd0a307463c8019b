"""Supervised fine-tuning: the SFT model that logit-averaging GRPO keeps as its frozen reference.

    torchrun --nproc-per-node 2 recipes/sft.py --config configs/sft.yaml model=DIR data=train.jsonl out=DIR

`data` is jsonl with one {"prompt": ..., "response": ...} per line; the response (plus EOS) is learned, the
prompt is context. The result is a plain Hugging Face directory. With `checkpoint_every=N` the run checkpoints
into OUT.checkpoints and a rerun of the same command resumes from there (SIGTERM or SIGUSR1 then checkpoints
and exits after the step). The run itself is `nemo_logitavg.trainer.main.run_sft`.
"""

from __future__ import annotations

from nemo_logitavg.trainer.main import main

if __name__ == "__main__":
    main(recipe="sft", description=__doc__)

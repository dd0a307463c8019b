"""Logit-averaging GRPO on pi_mix, or the KL-GRPO baseline (algorithm.ref_weight=0 algorithm.beta=0.05).

    torchrun --nproc-per-node 2 recipes/grpo.py --config configs/grpo.yaml model.policy=SFT_DIR data.train=F

With no `rollout.urls`, rank 0 starts one rollout server on 127.0.0.1 (stopped at the end). A rerun with the
same `run.dir` resumes from its newest checkpoint; SIGTERM or SIGUSR1 checkpoints and exits after the step.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from nemo_logitavg.config import GRPOConfig, load_config
from nemo_logitavg.data.prompts import read_training_prompts
from nemo_logitavg.models import LlamaConfig
from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
from nemo_logitavg.models.conversion.streaming import export_model_hf
from nemo_logitavg.parallel import init_parallel, rank_device, teardown
from nemo_logitavg.rewards import score_by_kind
from nemo_logitavg.trainer import GRPOTrainer, StopRequested


def main() -> None:
    stop = StopRequested()  # first: threads and processes started later inherit its blocked signals
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML config")
    args = parser.parse_args()
    cfg = load_config(GRPOConfig, args.config, args.overrides).validate()
    reference_dir = cfg.model.reference or cfg.model.policy

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.policy)

    prompts = read_training_prompts(cfg.data.train, tokenizer, cfg.data.reward)
    eval_prompts = read_training_prompts(cfg.data.test, tokenizer, cfg.data.reward) if cfg.data.test else []
    init_parallel(cfg.model.tensor_parallel, cfg.model.pipeline_parallel, seed=cfg.run.seed,
                  wait_timeout_s=cfg.wait_timeout())  # fmt: skip
    model_cfg = LlamaConfig.from_hf(cfg.model.policy)
    actor = LogitAveragingActor(
        model_cfg,
        LlamaConfig.from_hf(reference_dir),
        ActorConfig(
            ref_weight=cfg.algorithm.ref_weight, temperature=cfg.algorithm.temperature,
            params_dtype=torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32,
            reference_logprobs=cfg.algorithm.beta > 0, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
            clip_grad=cfg.optim.clip_grad, lr_warmup_steps=cfg.optim.warmup_steps,
        ),
    )  # fmt: skip
    actor.load_hf(cfg.model.policy, reference_dir)

    server, client = None, None
    if dist.get_rank() == 0:
        from nemo_logitavg.rollout.client import RolloutClient
        from nemo_logitavg.rollout.process import ServerProcess

        urls = list(cfg.rollout.urls)
        if not urls:
            log = os.path.join(cfg.run.dir, "rollout_server.log")
            # ref_weight 0 (the KL baseline) samples from the policy alone: the server need not load the reference.
            served_reference = reference_dir if cfg.algorithm.ref_weight > 0 else None
            # On a GPU machine the recipe's own server shares rank 0's GPU (the one-GPU check, DESIGN.md §7b).
            device = rank_device()
            extra = ["--device", str(device)] if device.type == "cuda" else []
            server = ServerProcess(
                cfg.model.policy, served_reference, cfg.algorithm.ref_weight, log, token=cfg.rollout.token,
                extra_args=["--dtype", cfg.model.dtype, *extra],
            ).wait_ready()  # no rollout.token: a random one, known only to this process and its server
            urls = [server.url]
        token = server.token if server is not None else cfg.rollout.token
        client = RolloutClient(urls, token=token, timeout=cfg.rollout.timeout, max_attempts=cfg.rollout.attempts)
        client.check(cfg.algorithm.ref_weight, dtype=None if cfg.rollout.allow_dtype_mismatch else cfg.model.dtype)

    def score(texts: list[str], answers: list[tuple[str, str]]) -> list[float]:
        kinds, golds = zip(*answers, strict=True) if answers else ((), ())
        return score_by_kind(texts, golds, kinds, math_timeout=cfg.data.reward_timeout)

    def export_policy(out_dir: str) -> None:
        export_model_hf(actor.gpt_policy, model_cfg, out_dir, source_dir=cfg.model.policy)

    try:
        GRPOTrainer(cfg, actor, prompts, client, score, export_policy, eval_prompts, stop).fit()
    finally:
        if server is not None:
            server.stop()
        teardown()


if __name__ == "__main__":
    main()

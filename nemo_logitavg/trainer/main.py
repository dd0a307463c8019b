"""The composition of a training run: configs to data, actor, servers and loop (``run_grpo``, ``run_sft``).

    torchrun --nproc-per-node N -m nemo_logitavg.trainer.main {sft,grpo} CONFIG.yaml [key=value ...]

``recipes/grpo.py`` and ``recipes/sft.py`` are the same entry points with ``--config CONFIG.yaml``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from nemo_logitavg.config import GRPOConfig, SFTConfig, load_config
from nemo_logitavg.data import encode_prompt, read_jsonl
from nemo_logitavg.data.prompts import read_training_prompts
from nemo_logitavg.models import LlamaConfig
from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
from nemo_logitavg.models.conversion.streaming import export_model_hf
from nemo_logitavg.ops import mixes_reference
from nemo_logitavg.parallel import init_parallel, rank_device, teardown
from nemo_logitavg.rewards import score_by_kind
from nemo_logitavg.rollout.client import RolloutClient
from nemo_logitavg.rollout.process import ServerProcess
from nemo_logitavg.trainer.loop import GRPOTrainer
from nemo_logitavg.trainer.sft import train_sft
from nemo_logitavg.trainer.stop import StopRequested


def run_grpo(cfg: GRPOConfig) -> None:
    """Logit-averaging GRPO (or the KL-GRPO baseline) as ``cfg`` says, on every rank of the torchrun job.

    With no ``rollout.urls``, rank 0 starts one rollout server on 127.0.0.1 (stopped at the end). A rerun with the
    same ``run.dir`` resumes from its newest checkpoint; SIGTERM or SIGUSR1 checkpoints and exits after the step.
    """
    stop = StopRequested("grpo")  # first: threads and processes started later inherit its blocked signals
    cfg = cfg.validate()
    reference_dir = cfg.model.reference or cfg.model.policy

    # transformers takes ~1 s to import: paid when a run starts, not by importing this module
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
        urls = list(cfg.rollout.urls)
        if not urls:
            log = os.path.join(cfg.run.dir, "rollout_server.log")
            # ref_weight 0 (the KL baseline) samples from the policy alone: the server need not load the reference.
            served_reference = reference_dir if mixes_reference(cfg.algorithm.ref_weight) else None
            # On a GPU machine the run's own server shares rank 0's GPU (the one-GPU check, docs/design.md §7b).
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


def run_sft(cfg: SFTConfig) -> None:
    """Supervised fine-tuning as ``cfg`` says: ``cfg.data`` (jsonl of ``{"prompt", "response"}``) to the Hugging
    Face directory ``cfg.out``, on every rank of the torchrun job.

    The response (plus EOS) is learned, the prompt is context. With ``checkpoint_every=N`` the run checkpoints into
    ``OUT.checkpoints`` and a rerun resumes from there; SIGTERM or SIGUSR1 then checkpoints and exits after the
    step, without writing ``cfg.out``.
    """
    stop = StopRequested("sft")  # first: threads and processes started later inherit its blocked signals

    # transformers takes ~1 s to import: paid when a run starts, not by importing this module
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
              checkpoint_every=cfg.checkpoint_every, stop=stop)  # fmt: skip
    if not stop.stopped:  # a stopped run is not finished: no Hugging Face directory that looks like one
        export_model_hf(actor.gpt_policy, model_cfg, cfg.out, source_dir=cfg.model)
    teardown()


RUNS: dict[str, tuple[type, Callable]] = {"grpo": (GRPOConfig, run_grpo), "sft": (SFTConfig, run_sft)}


def parse_command(
    argv: Sequence[str] | None = None, recipe: str | None = None, description: str | None = None
) -> tuple[str, str, list[str]]:
    """The command line of a training run, as ``(recipe, config file, key=value overrides)``.

    ``{sft,grpo} CONFIG.yaml [key=value ...]`` (this module); a recipe file that names its ``recipe`` takes
    ``--config CONFIG.yaml [key=value ...]``.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if recipe is None:
        parser.add_argument("recipe", choices=sorted(RUNS))
        parser.add_argument("config", help="the run's YAML config")
    else:
        parser.add_argument("--config", required=True, help="the run's YAML config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML config")
    args = parser.parse_args(argv)
    return recipe or args.recipe, args.config, list(args.overrides)


def main(argv: Sequence[str] | None = None, recipe: str | None = None, description: str | None = None) -> None:
    """Parse the command line (see ``parse_command``), load the config and run it."""
    name, config, overrides = parse_command(argv, recipe, description)
    schema, run = RUNS[name]
    run(load_config(schema, config, overrides))


if __name__ == "__main__":
    main(sys.argv[1:], description=__doc__)

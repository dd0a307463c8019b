"""Capacity planner: memory per GPU of a logit-averaging GRPO layout; exits 1 when it does not fit.

    python recipes/plan.py --model llama3-70b --tp 8 --pp 4 --dp 4 --micro-batch 1 --seq 4096 --recompute \
        --rollout-tp 8 --rollout-servers 4 --rollout-seqs 96 --rollout-context 4096
    python recipes/plan.py --config configs/grpo_logitavg_70b.yaml model.policy=llama3-70b [key=value ...]
    python recipes/plan.py --sweep configs/sweep_ref_weight_8b.yaml --index 3 model.policy=SFT_HF --shell

`--model` (and `model.policy` in a config) is a preset (llama3-8b, llama3-70b) or a Hugging Face directory. With
`--config` (or `--sweep` and the run's `--index`) the layout comes from the config's `cluster` section. The
launchers run it with `--shell`: the plan goes to stderr, and stdout carries shell assignments (`NLA_*`) describing
the run for launcher/common.sh, each line marked with `SHELL_MARK` (common.sh evaluates those lines only, so
whatever else reaches stdout, e.g. a library printing at import or a container banner, is never run). The
arithmetic is in nemo_logitavg/planning.py.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from nemo_logitavg.config import GRPOConfig, SweepConfig, load_config
from nemo_logitavg.planning import (
    GIB,
    VLLM_BATCHED_TOKENS,
    GPUSpec,
    RolloutLayout,
    TrainingLayout,
    check,
    format_plan,
    plan,
    plan_config,
    resolve_model,
)

SHELL_MARK = "nla-shell: "  # launcher/common.sh nla_plan evaluates only the stdout lines that start with it


def shell_assignments(cfg: GRPOConfig, config_path: str, overrides: list[str], sweep_runs: int,
                      rollout_gpu_gib: float) -> str:  # fmt: skip
    """What a launcher needs of a run, as bash assignments (values quoted for `eval`), one a line, each line
    starting with ``SHELL_MARK``. ``rollout_gpu_gib``: the planned memory of a rollout GPU, given to its engine.

    Raises:
        ValueError: a value holds a newline (its quoted form would span lines the launcher does not evaluate).
    """
    c = cfg.cluster
    reference = (cfg.model.reference or cfg.model.policy) if cfg.algorithm.ref_weight > 0 else ""
    scalars = {
        "NLA_CONFIG": config_path,
        "NLA_GPUS_PER_NODE": c.gpus_per_node,
        "NLA_TRAINER_NODES": c.trainer_nodes,
        "NLA_ROLLOUT_NODES": c.rollout_nodes,
        "NLA_ROLLOUT_TP": c.rollout_tp,
        "NLA_ROLLOUT_MAX_SEQS": c.rollout_max_seqs,
        "NLA_SERVERS_PER_NODE": c.servers_per_node,
        "NLA_ROLLOUT_PORT": c.rollout_port,
        "NLA_ROLLOUT_ENGINE": c.rollout_engine,
        "NLA_MAX_CONTEXT": c.max_context,
        "NLA_ROLLOUT_GPU_MEMORY_GIB": f"{rollout_gpu_gib:.6g}",  # the planner's budget, vLLM's gpu_memory_gib
        "NLA_ROLLOUT_BATCHED_TOKENS": VLLM_BATCHED_TOKENS,  # vLLM's max_num_batched_tokens, as planned
        "NLA_DTYPE": cfg.model.dtype,  # the servers serve in the trainer's dtype unless server_args say otherwise
        "NLA_POLICY": cfg.model.policy,
        "NLA_REFERENCE": reference,  # empty: ref_weight 0 serves the policy alone
        "NLA_REF_WEIGHT": cfg.algorithm.ref_weight,
        "NLA_RUN_DIR": cfg.run.dir,
        "NLA_SWEEP_RUNS": sweep_runs,  # 0: not a sweep
    }
    # Exported: the steps srun starts (the rollout servers) read them; arrays cannot be, and travel as arguments.
    lines = [f"export {key}={shlex.quote(str(value))}" for key, value in scalars.items()]
    for key, values in (("NLA_OVERRIDES", overrides), ("NLA_SERVER_ARGS", c.server_args)):
        lines.append(f"{key}=({' '.join(shlex.quote(v) for v in values)})")
    for key, value in [*scalars.items(), *(("NLA_OVERRIDES", v) for v in overrides),
                       *(("NLA_SERVER_ARGS", v) for v in c.server_args)]:  # fmt: skip
        if "\n" in str(value) or "\r" in str(value):
            raise ValueError(f"{key}: {str(value)!r} holds a line break, which the launcher cannot pass on")
    return "\n".join(SHELL_MARK + line for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a GRPO config with a cluster section (instead of the flags below)")
    parser.add_argument("--sweep", help="a sweep config (configs/sweep_*.yaml); plans run --index of its grid")
    parser.add_argument("--index", type=int, default=0, help="the sweep run (a Slurm array index)")
    parser.add_argument("--shell", action="store_true", help="plan to stderr, NLA_* assignments to stdout")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    parser.add_argument("--model", help="llama3-8b | llama3-70b | a Hugging Face directory")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, help="prompt + response tokens of a sequence")
    parser.add_argument("--recompute", action="store_true", help="full activation recomputation")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--rollout-tp", type=int, default=1, help="GPUs per inference server")
    parser.add_argument("--rollout-servers", type=int, default=1)
    parser.add_argument("--rollout-seqs", type=int, default=256, help="concurrent sequences a server caches")
    parser.add_argument("--rollout-context", type=int, default=None, help="max tokens a sequence (default --seq)")
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    parser.add_argument("--reserve-gib", type=float, default=6.0, help="CUDA context, NCCL, fragmentation")
    args = parser.parse_args(argv)
    if not (args.config or args.sweep) and not (args.model and args.seq):
        parser.error("give --config FILE, --sweep FILE --index I, or --model and --seq")
    if args.shell and not (args.config or args.sweep):
        parser.error("--shell describes a run: give --config or --sweep")

    try:
        cfg, sweep_runs = None, 0
        if args.sweep:
            sweep = load_config(SweepConfig, args.sweep).validate()
            config_path, overrides = sweep.base, sweep.run_overrides(args.index) + args.overrides
            sweep_runs = len(sweep)
        elif args.config:
            config_path, overrides = args.config, args.overrides
        if args.config or args.sweep:
            cfg = load_config(GRPOConfig, config_path, overrides).validate()
            result = plan_config(cfg)
        else:
            result = plan(
                resolve_model(args.model),
                TrainingLayout(args.tp, args.pp, args.dp, args.micro_batch, args.seq, args.recompute,
                               args.sequence_parallel),
                RolloutLayout(args.rollout_tp, args.rollout_servers, args.rollout_seqs,
                              args.rollout_context or args.seq),
                GPUSpec(args.gpu_gib, args.reserve_gib),
            )  # fmt: skip
        print(format_plan(result), file=sys.stderr if args.shell else sys.stdout)
        check(result)
        shell = None
        if args.shell:
            shell = shell_assignments(cfg, config_path, overrides, sweep_runs, result.gpu.available / GIB)
    except (ValueError, FileNotFoundError) as exc:
        print(f"plan: {exc}", file=sys.stderr)
        return 1
    if shell is not None:
        print(shell)
    return 0


if __name__ == "__main__":
    sys.exit(main())

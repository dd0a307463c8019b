#!/bin/bash
# The ref_weight ablation: one array task a (ref_weight, seed) pair of configs/sweep_ref_weight_8b.yaml, each a
# full 8B run (launcher/grpo_logitavg_8b.sh's layout, 2 nodes) writing runs/sweep_ref_weight_8b/a{a}_seed{seed}.
#   sbatch launcher/sweep_ref_weight.sh model.policy=SFT_HF [key=value overrides of every run]
#   NLA_SWEEP=configs/my_sweep.yaml sbatch --array=0-N launcher/sweep_ref_weight.sh ...   (another grid)
# --array must cover the grid (ref_weights x seeds); add %K (e.g. --array=0-11%4) to run at most K at once.
# Preemptible like the single runs: each task checkpoints on USR1, requeues and resumes.
#SBATCH --job-name=sweep-ref-weight-8b
#SBATCH --array=0-11
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -uo pipefail
# shellcheck source=launcher/common.sh
source "${SLURM_SUBMIT_DIR}/launcher/common.sh"
nla_setup
nla_grpo --sweep "${NLA_SWEEP:-configs/sweep_ref_weight_8b.yaml}" \
    --index "${SLURM_ARRAY_TASK_ID:?submit as a job array (sbatch --array=...)}" "$@"

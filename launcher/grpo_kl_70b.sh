#!/bin/bash
# KL-GRPO baseline, Llama-3.3-70B-class, on the budget of grpo_logitavg_70b.sh (only ref_weight=0 and beta differ).
#   sbatch launcher/grpo_kl_70b.sh model.policy=SFT_HF [key=value overrides of configs/grpo_kl_70b.yaml]
# 12 H100 nodes: the first cluster.trainer_nodes train, the rest serve rollouts (README: Launchers). Runs in the
# Dockerfile's image (NLA_CONTAINER_IMAGE, default ./nemo-logitavg.sqsh; =none for the host). Preemptible: USR1
# 1200 s before the time limit checkpoints and requeues; the requeued job resumes from run.dir.
#SBATCH --job-name=grpo-kl-70b
#SBATCH --nodes=12
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@1200
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail
# shellcheck source=launcher/common.sh
source "${SLURM_SUBMIT_DIR}/launcher/common.sh"
nla_setup
nla_grpo --config configs/grpo_kl_70b.yaml "$@"

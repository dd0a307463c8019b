#!/bin/bash
# Logit-averaging GRPO, tiny, on one CPU node: two trainer ranks (TP=2) and a rollout server started by rank 0.
#   sbatch launcher/grpo_logitavg_tiny.sh model.policy=SFT_DIR data.train=train.jsonl [key=value ...]
# Preemptible: USR1 30 s before the time limit (or `scancel --signal=USR1 --batch JOB`) checkpoints and requeues.
#SBATCH --job-name=grpo-logitavg-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@30
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail
# shellcheck source=launcher/common.sh
source "${SLURM_SUBMIT_DIR}/launcher/common.sh"
nla_setup
nla_run_step python recipes/grpo.py --config configs/grpo_logitavg_tiny.yaml "$@"

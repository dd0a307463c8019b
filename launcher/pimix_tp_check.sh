#!/bin/bash
# The pi_mix tensor-parallel check (recipes/pimix_tp_check.py) on one node, two tasks (TP=2), CPU or GPU.
#   sbatch launcher/pimix_tp_check.sh [key=value overrides of configs/pimix_check.yaml]
#SBATCH --job-name=pimix-tp-check
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:15:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
# shellcheck source=launcher/common.sh
source "${SLURM_SUBMIT_DIR}/launcher/common.sh"
nla_setup
nla_srun python recipes/pimix_tp_check.py "$@"
cat "${NLA_LOG_DIR}/rank0.log"

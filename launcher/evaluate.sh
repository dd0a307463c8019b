#!/bin/bash
# Evaluation on one GPU node (recipes/evaluate.py): each model is served in turn by a rollout server on this node
# and scored; reports with bootstrap intervals and a paired comparison go to --out.
#   sbatch launcher/evaluate.sh --data data/math/test.jsonl --model sft=SFT_HF --model kl=KL_HF \
#       --model la=BUNDLE --baseline sft --seeds 0,1,2 --sampled-k 4 --out reports/8b
# The servers use the vLLM engine over NLA_EVAL_TP GPUs (default 8). Runs in the Dockerfile's image
# (NLA_CONTAINER_IMAGE, default ./nemo-logitavg.sqsh; =none for the host). No capacity plan: there is no training
# layout, and one server at a time gets the node (python recipes/plan.py --model llama3-70b --seq 4096
# --rollout-tp 8 shows what a TP8 server holds).
#SBATCH --job-name=evaluate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=08:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
# shellcheck source=launcher/common.sh
source "${SLURM_SUBMIT_DIR}/launcher/common.sh"
nla_setup
nla_use_container
printf 'vllm:\n  tensor_parallel_size: %s\n' "${NLA_EVAL_TP:-8}" > "${NLA_LOG_DIR}/server.yaml"
nla_srun --nodes=1 --ntasks=1 python recipes/evaluate.py --server-arg=--engine --server-arg=vllm \
    --server-arg=--config="${NLA_LOG_DIR}/server.yaml" "$@"

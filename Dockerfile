# nemo-logitavg on the NGC NeMo container (torch, megatron-core 0.16.0, Transformer Engine, apex, vLLM inside).
#   docker build -t nemo-logitavg .      (or: enroot import dockerd://nemo-logitavg for pyxis)
FROM nvcr.io/nvidia/nemo:26.02

WORKDIR /opt/nemo-logitavg
COPY pyproject.toml README.md constraints.txt ./
COPY nemo_logitavg ./nemo_logitavg
COPY recipes ./recipes
COPY configs ./configs
COPY launcher ./launcher

# --no-deps: never replace the container's torch, megatron-core, Transformer Engine, apex or vLLM.
# Then install only what the container may lack, and fail the build if anything is still missing.
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir omegaconf sentencepiece psutil pyyaml "math-verify>=0.9,<0.10" \
 && python -c "import torch, megatron.core, omegaconf, sentencepiece, math_verify, nemo_logitavg.ops; print('megatron-core', megatron.core.__version__)"

ENV PYTHONUNBUFFERED=1

# GPU image: NGC PyTorch (CUDA, NCCL, Transformer Engine and apex included) + megatron_prune.
#   bash docker/build.sh            (or: docker build -t megatron_prune:latest .)
# The NGC container's own torch satisfies our `torch` requirement, so pip keeps it; megatron-core comes from PyPI
# in the range pyproject.toml declares (the 25.x containers run Python 3.12, which newer megatron-core needs).
ARG NGC_TAG=25.04-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    NCCL_ASYNC_ERROR_HANDLING=1

WORKDIR /opt/megatron_prune
COPY pyproject.toml README.md ./
COPY megatron_prune ./megatron_prune
COPY tools ./tools
COPY scripts ./scripts
COPY docker ./docker
RUN pip install -e ".[zst]" && python -m megatron_prune --help >/dev/null

WORKDIR /workspace
CMD ["bash"]

# featx on a CUDA-capable base: `docker run --gpus all -v $PWD:/data -v featx-cache:/cache featx extract /data/images -o /data/features.npz`
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# Downloaded timm / torchvision weights live in the cache volume, so they survive container restarts.
# HOME and MPLCONFIGDIR point at writable places so that `docker run --user "$(id -u):$(id -g)"` works too.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    FEATX_CACHE_DIR=/cache/featx \
    HOME=/tmp/featx-home \
    MPLCONFIGDIR=/tmp/featx-home/matplotlib
# featx's DataLoader workers need shared memory: run with --shm-size=1g (or --ipc=host) for many workers.

WORKDIR /opt/featx
COPY pyproject.toml README.md ./
COPY featx ./featx
# torch is already in the base image; the loose `torch>=2.3` range keeps pip from replacing it.
# /cache and HOME are writable by any user (sticky, like /tmp): a named volume starts with these permissions.
RUN pip install ".[embedded,audit,export,parquet,faiss]" && featx models >/dev/null \
    && mkdir -p /cache/huggingface /cache/torch /cache/featx /tmp/featx-home \
    && chmod -R 1777 /cache /tmp/featx-home

VOLUME ["/data", "/cache"]
WORKDIR /data
ENTRYPOINT ["featx"]
CMD ["--help"]

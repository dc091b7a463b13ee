# featx on a CUDA-capable base: `docker run --gpus all -v $PWD:/data -v featx-cache:/cache featx extract /data/images -o /data/features.npz`
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

# Downloaded timm / torchvision weights live in the cache volume, so they survive container restarts.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch
# featx's DataLoader workers need shared memory: run with --shm-size=1g (or --ipc=host) for many workers.

WORKDIR /opt/featx
COPY pyproject.toml README.md ./
COPY featx ./featx
# torch is already in the base image; the loose `torch>=2.3` range keeps pip from replacing it.
RUN pip install ".[embedded]" && featx models >/dev/null

VOLUME ["/data", "/cache"]
WORKDIR /data
ENTRYPOINT ["featx"]
CMD ["--help"]

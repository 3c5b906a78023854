# syntax=docker/dockerfile:1
# evomerge: one image for the Ray head, the GPU workers and the search controller (a Ray Job).
#
#   docker build -t evomerge:0.1.0 .
#   head:    docker run --gpus all -v evomerge-data:/data -p 6379:6379 -p 8265:8265 evomerge:0.1.0 \
#              ray start --head --port=6379 --dashboard-host=0.0.0.0 --block
#   worker:  docker run --gpus all -v evomerge-data:/data evomerge:0.1.0 \
#              ray start --address=HEAD:6379 --block
#   job:     evomerge submit --address http://HEAD:8265 experiments/evollm_jp_ps.yaml --run-dir /data/runs/x
# On Kubernetes, KubeRay starts Ray in it (deploy/kuberay/). CUDA: torch's wheels bring the CUDA
# runtime; the host's driver comes in through the NVIDIA container toolkit (--gpus / nvidia.com/gpu).
FROM python:3.11-slim-bookworm

# wget: KubeRay's health probes call it. tini: a PID 1 that forwards SIGTERM (a clean, resumable stop).
# Debian's security updates replace package versions, so these are not pinned (hadolint DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget tini \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf-cache \
    EVOMERGE_CACHE=/data/evomerge-cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# uid 1000 "ray", like the rayproject images, so KubeRay's defaults and shared volumes line up
RUN useradd --create-home --uid 1000 --shell /bin/bash ray \
    && mkdir -p /data /opt/evomerge \
    && chown ray:ray /data /opt/evomerge

WORKDIR /opt/evomerge
# dependencies first (a layer that survives code changes), pinned to the versions CI tests
COPY requirements-lock.txt ./
RUN pip install --no-cache-dir -r requirements-lock.txt

COPY pyproject.toml README.md ./
COPY evomerge ./evomerge
COPY experiments ./experiments
COPY search_spaces ./search_spaces
RUN pip install --no-cache-dir --no-deps -c requirements-lock.txt .

USER 1000:1000
# run dirs, the Hugging Face cache (source models) and the zoo cache: mount shared storage here
VOLUME ["/data"]
ENTRYPOINT ["tini", "--"]
CMD ["evomerge", "--help"]

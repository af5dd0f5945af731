# syntax=docker/dockerfile:1
# One image, one agent per container: `python runner.py` with the configuration in the environment
# (see .env.example). Build (CPU torch):
#   docker build -t REGION-docker.pkg.dev/PROJECT/trading/runner:v1 .
# CUDA torch (GPU node pool; the driver comes from the node, the CUDA runtime from torch's wheels):
#   docker build --build-arg TORCH_VARIANT=cu126 -t .../runner:v1-cuda .
# Bake a Chronos checkpoint in (downloaded at build time, then CHRONOS_MODEL=/opt/models/chronos):
#   docker build --build-arg CHRONOS_BAKE=amazon/chronos-bolt-small -t .../runner:v1-bolt .
# No secret is ever passed as a build argument or copied in: keys come at run time from the
# environment or Google Secret Manager (runtime/secrets.py).

# ---- builder: a virtualenv with every dependency --------------------------------------------
FROM python:3.11-slim-bookworm AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG CHRONOS_BAKE=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, from PyTorch's own index: a plain `pip install -r` would pull the newest torch
# plus ~2 GB of CUDA wheels. requirements.txt pins torch==TORCH_VERSION, which the +cpu / +cuXXX
# local build then satisfies.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}"
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt \
    && python -c "import torch, backtrader, chronos; print('torch', torch.__version__)"
# FMEL's compiled reads and record (setup.py, analyzers/tracking/_fastread.c, _record.c, _resolve.c), built where a C
# compiler can be installed; the runtime stage gets only the module. Debian's gcc/libc6-dev are
# not pinned: bookworm's security updates replace exact versions (a pin would break the build).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY setup.py /opt/ext/setup.py
COPY analyzers/tracking/_fastread.c analyzers/tracking/_resolve.c analyzers/tracking/_resolve.h \
     analyzers/tracking/_record.c analyzers/tracking/_record.h analyzers/tracking/_build.py \
     /opt/ext/analyzers/tracking/
WORKDIR /opt/ext
RUN python setup.py build_ext --inplace \
    && python -c "import analyzers.tracking._fastread"
# Optional: bake a Chronos checkpoint (a Hugging Face id) so pods never download at start.
RUN mkdir -p /opt/models \
    && if [ -n "${CHRONOS_BAKE}" ]; then \
        CHRONOS_BAKE="${CHRONOS_BAKE}" python -c "import os; from huggingface_hub import snapshot_download; snapshot_download(os.environ['CHRONOS_BAKE'], local_dir='/opt/models/chronos')" \
        && python -c "from chronos import BaseChronosPipeline; BaseChronosPipeline.from_pretrained('/opt/models/chronos')"; \
    fi

# ---- runtime: the venv, the code, a non-root user --------------------------------------------
FROM python:3.11-slim-bookworm AS runtime
# DUCKDB_JE_MALLOC_CONF: DuckDB's bundled jemalloc gives freed pages back at once instead of
# after 1 s (DuckDB's own malloc_conf). A live run writing decision records held up to 0.4-0.7 GB more at 500 symbols
# without it (100 symbols: peak 489-528 MB -> 383-384 MB, 3 runs each; docs/benchmarks.md,
# seventh pass); a read-heavy backtest's final flush takes ~0.1 s longer with it.
ENV PATH=/opt/venv/bin:$PATH \
    DUCKDB_JE_MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_FORMAT=json \
    HEALTH_PORT=8080 \
    FMEL_LOCAL_PATH=/var/lib/runner/fmel.duckdb \
    FMEL_SPILL_DIR=/var/lib/runner/spill \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    MPLCONFIGDIR=/tmp/.cache/matplotlib
RUN groupadd --system --gid 10001 runner \
    && useradd --system --uid 10001 --gid runner --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin runner \
    && mkdir -p /var/lib/runner \
    && chown runner:runner /var/lib/runner
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/models /opt/models
WORKDIR /app
# Code and the bundled data only, owned by root: the runner cannot change its own code.
COPY runner.py ./
COPY core/ core/
COPY runtime/ runtime/
COPY feeds/ feeds/
COPY analyzers/ analyzers/
COPY --from=builder /opt/ext/analyzers/tracking/_fastread*.so analyzers/tracking/
COPY agents/ agents/
COPY data/ data/
COPY sql/ sql/
USER 10001:10001
# /var/lib/runner: decision store and spill files (an emptyDir or a volume in Kubernetes).
VOLUME ["/var/lib/runner"]
EXPOSE 8080
# Liveness of the /healthz endpoint; HEALTH_PORT=0 turns the endpoint off and the check passes.
# MODE=optimize (a research study) serves no health endpoint: nothing to probe there.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; p = os.environ.get('HEALTH_PORT', '8080'); sys.exit(0 if p == '0' or os.environ.get('MODE') == 'optimize' else urllib.request.urlopen('http://127.0.0.1:%s/healthz' % p, timeout=4).status != 200)"]
# SIGTERM (docker stop, pod deletion) stops cleanly within SHUTDOWN_TIMEOUT_S; python is PID 1
# and handles it itself.
STOPSIGNAL SIGTERM
# The same image runs the market-data ingestor, `python -m runtime.ingest` (docs/ingest.md):
#   docker run --entrypoint python IMAGE -m runtime.ingest     (k8s.yaml: Deployment ingest)
# with the same HEALTH_PORT probes, JSON logs and SIGTERM handling.
ENTRYPOINT ["python", "runner.py"]

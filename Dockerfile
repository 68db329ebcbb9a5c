# llava-ov OpenAI-compatible server: the torch-free runtime (numpy, Pillow, OpenVINO) + FastAPI/uvicorn.
#
#   docker build -t llava-ov-server .
#   docker run --rm -p 8000:8000 -v "$PWD/models/demo:/model:ro" llava-ov-server
#
# The model is an export directory (`llava-ov convert ...` on a machine with the [convert] extra) mounted at /model.
FROM python:3.11-slim

# MALLOC_ARENA_MAX=2: with glibc's default of one arena per thread, the freed buffers of large image
# decodes stayed with the server (RSS 182 -> 1012 MB over six rounds of the hostile load test,
# flat at ~500 MB with two arenas; docs/server.md, "Load test")
ENV PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=2 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
RUN pip install -c constraints.txt ".[serve]" && rm -rf /app/src

# Run unprivileged; OpenVINO's compiled-model cache goes to $HOME/.cache/llava-ov/compiled.
RUN useradd --create-home --uid 10001 llava
USER llava

VOLUME /model
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"

# Set LLAVA_OV_API_KEY to require a key; add flags with `docker run IMAGE llava-ov serve /model --host 0.0.0.0 ...`.
CMD ["llava-ov", "serve", "/model", "--host", "0.0.0.0", "--port", "8000"]

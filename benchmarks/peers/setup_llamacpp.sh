#!/usr/bin/env bash
# llama.cpp through llama-cpp-python, in its own venv (benchmarks/peers/.venv-llamacpp).
# It compiles llama.cpp for this CPU: about 14 minutes on 2 cores. The [server] extra brings its
# OpenAI-compatible server (python -m llama_cpp.server), which `tokenmill bench serve` measures.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv-llamacpp"
python3.11 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install "llama-cpp-python[server]==0.3.36"
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"

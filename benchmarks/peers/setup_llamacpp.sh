#!/usr/bin/env bash
# llama.cpp through llama-cpp-python, in its own venv (benchmarks/peers/.venv-llamacpp).
# It compiles llama.cpp for this CPU: about 14 minutes on 2 cores. The [server] extra brings its
# OpenAI-compatible server (python -m llama_cpp.server), which `tokenmill bench serve` measures.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv-llamacpp"
python3.11 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# AMX off: on the Xeon of 2026-12 its AMX matmul (Q8_0, Q4_x) dies of SIGILL in a worker thread's
# first tileloadd (gdb: ggml_backend_amx_mul_mat), though AMX itself runs there (a standalone
# ldtilecfg/tilezero test passes) and the process holds the XTILEDATA permission. Its AVX-512
# VNNI and repacked kernels stay on. With GGML_NATIVE the ISA comes from -march=native (the
# GGML_AMX_* options apply only without it), so AMX is switched off in the compiler flags.
no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'" \
    "$venv/bin/pip" install --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==0.3.36"
"$venv/bin/pip" install "llama-cpp-python[server]==0.3.36"
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"

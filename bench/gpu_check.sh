#!/usr/bin/env bash
# The GPU checks in one call of at most 8 minutes, for a machine with one CUDA GPU and its own torch
# (it installs nothing from the network). It runs tests/engine/test_gpu.py, then `bench/bench.py --device
# cuda --model 8b --json`, and leaves both logs and the JSON in $OUT (or ./gpu-check-out).
#
# llm-compressor and compressed-tensors, which the tests and the bench compare against, travel as
# wheels in .whl/ (ignored by git): fetch them once with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl llmcompressor==0.14.0.1 compressed-tensors==0.19.0 pydantic pydantic-core \
#     annotated-types typing-inspection loguru datasets dill multiprocess
# and keep one version of each (pydantic-core must be the one pydantic names).
set -uo pipefail
out=${OUT:-gpu-check-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fp8q-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/fp8q-site
fi
# fp8q from this checkout, without installing it (the bench runs `python -m fp8q`)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

# about 1 minute: every GPU test, each comparing CUDA bytes with the CPU's
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/engine/test_gpu.py 2>&1 | tee "$out/test_gpu.log"
# about 5 minutes: the 8b-shaped checkpoint (16 GB), three runs of each contender, warm cache
timeout 330 python3 bench/bench.py --device cuda --model 8b --warm --json \
    >"$out/bench.json" 2>"$out/bench.log"
echo "bench exit $?"
tail -30 "$out/bench.log"
cat "$out/bench.json"

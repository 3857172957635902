#!/usr/bin/env bash
# Everything the GPU side needs, in one command on a CUDA machine (docs/PERFORMANCE.md): tests/gpu, then
# bench/kernels.py with the arguments given:
#
#   bash bench/gpu_session.sh --bits 4,3 --ms 1,8,32,512 --torch-ref --exllama --cuda
#
# The mma kernel's library is built with the machine's nvcc before the tests (7 s; cached in ~/.cache).
# For a machine without network: wheels in .whl (pydantic and its three dependencies, exllamav2) are installed
# first, and a built exllamav2_ext.so in .device-carry is imported instead of compiling exllamav2's extension
# (126 s on an H100); without one, the compiled .so is left under $OUT/exl in 15 MB parts
# (`cat exl/exllamav2_ext.so.part* > .device-carry/exllamav2_ext.so`). Logs and the benchmark's JSON go to $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
if [ -f .device-carry/exllamav2_ext.so ]; then
  export PYTHONPATH="$PWD/.device-carry:$PYTHONPATH"
fi
export TORCH_EXTENSIONS_DIR=/tmp/tx MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
start=$(date +%s)
python3 -c "from exllamav2 import ext; print('exllamav2_ext:', ext.exllamav2_ext.__file__)"
echo "exllamav2 import: $(( $(date +%s) - start )) s"
if [ ! -f .device-carry/exllamav2_ext.so ] && [ -f /tmp/tx/exllamav2_ext/exllamav2_ext.so ]; then
  mkdir -p "$OUT/exl" && split -b 15M -d /tmp/tx/exllamav2_ext/exllamav2_ext.so "$OUT/exl/exllamav2_ext.so.part"
fi
start=$(date +%s)
python3 -c "from gptq_bridge.kernels.cuda import build as cuda_build as b; print('cuda kernel library:', b.library()._name)" 2>&1 | tail -5
echo "cuda kernel build: $(( $(date +%s) - start )) s"
start=$(date +%s)
# TESTS: a pytest -k expression to run part of tests/gpu (the whole of it takes ~6 minutes), or "none"
if [ "${TESTS:-}" != none ]; then
  python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider --durations=8 ${TESTS:+-k "$TESTS"} 2>&1 \
    | tee "$OUT/gpu-tests.log" | tail -24
fi
echo "tests/gpu: $(( $(date +%s) - start )) s"
python3 bench/kernels.py "$@" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -60

#!/usr/bin/env bash
# A 70B-shape 4-bit g32 act-order checkpoint split across two GPUs with gpu_split, against one GPU and against
# exllamav2's own gpu_split, in one command on a machine with two GPUs (bench/multi_gpu.py says what it does):
#
#   bash bench/multi_gpu.sh                 # two GPUs; about 40 GB of checkpoint on disk, 48 GB of host memory
#   bash bench/multi_gpu.sh --dry-run       # one GPU, a small model: the same steps, to check the script
#
# Set up as bench/gpu_session.sh does: wheels in .whl, gptq-bridge installed from this checkout, a built
# exllamav2_ext.so in .device-carry if there is one. The JSON report and the log go to $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/multi-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -c "import gptq_bridge" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
if [ -f .device-carry/exllamav2_ext.so ]; then
  export PYTHONPATH="$PWD/.device-carry:${PYTHONPATH:-}"
fi
export TORCH_EXTENSIONS_DIR=/tmp/tx MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
name=multi-gpu
case " $* " in *" --dry-run "*) name=multi-gpu-dry-run ;; esac
# the checkpoint stays in /tmp/multi-gpu-work: a second run on the same machine skips writing it
python3 bench/multi_gpu.py --workdir "/tmp/multi-gpu-work${name#multi-gpu}" --out "$OUT/$name.json" "$@" 2>&1 \
  | tee "$OUT/$name.log"
exit "${PIPESTATUS[0]}"

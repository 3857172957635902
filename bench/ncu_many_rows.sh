#!/usr/bin/env bash
# Nsight Compute on the many-rows path (docs/PERFORMANCE.md): the third call of q4_many_rows on one
# Llama-2-70B shape, with per-instruction stall samples, and fp16 cuBLAS (torch.matmul) on the same shape.
#
#   K=8192 N=8192 M=512 bash bench/ncu_many_rows.sh     (device; after `pip install -e .`)
#
# Writes under $OUT: mr-details.txt (SpeedOfLight, compute, warp-state and memory sections), mr-sass.csv (the
# kernel's SASS with stall samples per instruction), cublas-details.txt; prints the headline numbers.
set -u
OUT=${OUT:-/tmp/ncu}
K=${K:-8192} N=${N:-8192} M=${M:-512}
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
SECTIONS="--section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy"
"$NCU" --target-processes all -k regex:q4_many_rows --launch-skip 2 --launch-count 1 $SECTIONS \
  --section SourceCounters -f -o "$OUT/mr" python3 bench/profile_cuda_decode.py --k "$K" --n "$N" --ms "$M" \
  > "$OUT/mr-ncu.log" 2>&1 || { tail -20 "$OUT/mr-ncu.log"; exit 1; }
"$NCU" -i "$OUT/mr.ncu-rep" --page details > "$OUT/mr-details.txt"
"$NCU" -i "$OUT/mr.ncu-rep" --page source --csv --print-source sass > "$OUT/mr-sass.csv" 2>&1
rm -f "$OUT/mr.ncu-rep"
"$NCU" --target-processes all -k "regex:gemm|nvjet|sm90|cutlass" --launch-skip 2 --launch-count 1 $SECTIONS \
  python3 -c "
import torch
x = torch.randn($M, $K, device='cuda').half(); w = torch.randn($K, $N, device='cuda').half()
for _ in range(4): x @ w
torch.cuda.synchronize()" > "$OUT/cublas-details.txt" 2>&1
for f in mr-details.txt cublas-details.txt; do
  echo "== $f"
  grep -E "^  [a-zA-Z_0-9]+.*\(|Duration|SM Frequency|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|Executed Ipc A|Warp Cycles Per Issued|No Eligible|Stall|pipe|Pipe" "$OUT/$f" | head -40
done

"""Measured speeds of the built-in kernels, the numbers selection ranks them by (KernelSpec.measured_us).

Microseconds per call of one Llama-2-70B decoder layer's seven Linears (q and o 8192x8192, k and v
8192x1024, gate and up 8192x28672, down 28672x8192; K x N), group 128, act-order, float16, keyed by
(bits, m) with m the rows per call: CUDA-graph replays (launch overhead removed), weights rotated past L2.
triton, exllama and cuda: `bash bench/gpu_session.sh --bits 4,3 --ms 1,8,32,512 --exllama --cuda
--no-triton-paths --no-sweep --no-cuda-sweep` (bench/kernels.py, which prints this table last; every kernel at
its default launch configuration) on one NVIDIA H100 80GB HBM3, 2026-11-27 22:35 UTC; raw numbers in
bench/results/kernels-h100-2026-11-27-3bit.json. (Since then the cuda kernel overlaps the activation gather
with its launch up to 16 rows, 1-7% faster there in A/B runs, docs/PERFORMANCE.md; not re-measured here.)
cuda at m = 512: its Hopper wgmma kernel (warp-specialized), re-measured with `python3 bench/kernels.py --bits
4,3 --ms 512 --cuda --no-triton-paths --no-sweep --no-cuda-sweep` (what bench/gpu_session.sh runs) on one NVIDIA
H100 80GB HBM3, 2026-11-28 01:59 UTC (bench/results/kernels-m512-warp-specialized-h100-2026-11-28.{log,json};
triton's m = 512 in that run, 2002.7 / 2357.2, is within 4% of the number kept below). torch: the same bench with --torch-ref, 2026-11-27 17:00 UTC
(bench/results/kernels-h100-2026-11-27.json; its code has not changed since). docs/PERFORMANCE.md has the
tables. A third-party kernel registers its own numbers in its KernelSpec.
"""

MEASURED_US: dict[str, dict[tuple[int, int], float]] = {
    "triton": {(4, 1): 318.6, (4, 8): 561.1, (4, 32): 648.6, (4, 512): 2029.2,
               (3, 1): 325.9, (3, 8): 1437.5, (3, 32): 1486.8, (3, 512): 2272.5},
    "exllama": {(4, 1): 242.5, (4, 8): 490.9, (4, 32): 1552.3, (4, 512): 2231.8},
    "cuda": {(4, 1): 231.8, (4, 8): 262.0, (4, 32): 480.2, (4, 512): 1414.0,
             (3, 1): 219.2, (3, 8): 242.3, (3, 32): 489.8, (3, 512): 1420.9},
    "torch": {(4, 1): 20427.6, (4, 8): 20185.1, (4, 32): 20203.1, (4, 512): 20767.9,
              (3, 1): 48887.7, (3, 8): 51147.4, (3, 32): 49958.0, (3, 512): 49456.6},
}

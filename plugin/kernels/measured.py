"""Measured speeds of the built-in kernels, the numbers selection ranks them by (KernelSpec.measured_us).

Microseconds per call of one Llama-2-70B decoder layer's seven Linears (q and o 8192x8192, k and v
8192x1024, gate and up 8192x28672, down 28672x8192; K x N), group 128, act-order, float16, keyed by
(bits, m) with m the rows per call: CUDA-graph replays (launch overhead removed), weights rotated past L2.
triton, exllama and cuda: `TESTS=none bash bench/gpu_session.sh --bits 4,3 --ms 1,8,32,512 --exllama --cuda
--no-triton-paths --no-sweep --no-cuda-sweep` (bench/kernels.py, which prints this table last; every kernel at
its default launch configuration) on one NVIDIA H100 80GB HBM3, 2026-11-28 02:19 UTC, with the warp-specialized
wgmma kernel for m = 512; raw numbers in bench/results/kernels-full-h100-2026-11-28.{log,json}. torch: the
same bench with --torch-ref, 2026-11-27 17:00 UTC (bench/results/kernels-h100-2026-11-27.json; its code has not
changed since). docs/PERFORMANCE.md has the
tables. A third-party kernel registers its own numbers in its KernelSpec.
"""

MEASURED_US: dict[str, dict[tuple[int, int], float]] = {
    "triton": {(4, 1): 321.7, (4, 8): 561.6, (4, 32): 651.0, (4, 512): 2000.8,
               (3, 1): 320.4, (3, 8): 1441.2, (3, 32): 1474.0, (3, 512): 2244.6},
    "exllama": {(4, 1): 242.1, (4, 8): 490.1, (4, 32): 1540.4, (4, 512): 2204.6},
    "cuda": {(4, 1): 225.1, (4, 8): 260.3, (4, 32): 479.0, (4, 512): 1417.9,
             (3, 1): 209.4, (3, 8): 243.3, (3, 32): 481.9, (3, 512): 1420.8},
    "torch": {(4, 1): 20427.6, (4, 8): 20185.1, (4, 32): 20203.1, (4, 512): 20767.9,
              (3, 1): 48887.7, (3, 8): 51147.4, (3, 32): 49958.0, (3, 512): 49456.6},
}

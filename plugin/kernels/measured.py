"""Measured speeds of the built-in kernels, the numbers selection ranks them by (KernelSpec.measured_us).

Microseconds per call of one Llama-2-70B decoder layer's seven Linears (q and o 8192x8192, k and v
8192x1024, gate and up 8192x28672, down 28672x8192; K x N), group 128, act-order, float16, keyed by
(bits, m) with m the rows per call: CUDA-graph replays (launch overhead removed), weights rotated past L2.
triton, exllama and cuda: `TESTS=none bash bench/gpu_session.sh --bits 4,3 --ms 1,8,32,512 --exllama --cuda
--no-sweep --no-cuda-sweep` (bench/kernels.py, which prints this table last; every kernel at its default launch
configuration) on one NVIDIA H100 80GB HBM3, 2026-11-27 20:02 UTC; raw numbers in
bench/results/kernels-h100-2026-11-27-cuda.json. torch: the same bench with --torch-ref, 2026-11-27 17:00 UTC
(bench/results/kernels-h100-2026-11-27.json; its code has not changed since). docs/PERFORMANCE.md has both
tables. A third-party kernel registers its own numbers in its KernelSpec.
"""

MEASURED_US: dict[str, dict[tuple[int, int], float]] = {
    "triton": {(4, 1): 318.6, (4, 8): 560.9, (4, 32): 641.2, (4, 512): 2005.2,
               (3, 1): 324.8, (3, 8): 1429.8, (3, 32): 1463.8, (3, 512): 2249.8},
    "exllama": {(4, 1): 242.3, (4, 8): 488.4, (4, 32): 1543.5, (4, 512): 2217.7},
    "cuda": {(4, 1): 231.8, (4, 8): 259.8, (4, 32): 476.6, (4, 512): 2075.0},
    "torch": {(4, 1): 20427.6, (4, 8): 20185.1, (4, 32): 20203.1, (4, 512): 20767.9,
              (3, 1): 48887.7, (3, 8): 51147.4, (3, 32): 49958.0, (3, 512): 49456.6},
}

"""Measured speeds of the built-in kernels, the numbers selection ranks them by (KernelSpec.measured_us).

Microseconds per call of one Llama-2-70B decoder layer's seven Linears (q and o 8192x8192, k and v
8192x1024, gate and up 8192x28672, down 28672x8192; K x N), group 128, act-order, float16, keyed by
(bits, m) with m the rows per call: CUDA-graph replays (launch overhead removed), weights rotated past L2.
From `bash bench/gpu_session.sh --bits 4,3 --ms 1,8,32,512 --torch-ref --exllama` (bench/kernels.py, which
prints this table last) on one NVIDIA H100 80GB HBM3, 2026-11-27 17:00 UTC; the run's numbers are in
bench/results/kernels-h100-2026-11-27.json and docs/PERFORMANCE.md. A third-party kernel registers its own
numbers in its KernelSpec.
"""

MEASURED_US: dict[str, dict[tuple[int, int], float]] = {
    "triton": {(4, 1): 295.3, (4, 8): 550.3, (4, 32): 636.5, (4, 512): 2011.7,
               (3, 1): 313.1, (3, 8): 1236.7, (3, 32): 1327.1, (3, 512): 2366.7},
    "exllama": {(4, 1): 273.0, (4, 8): 523.2, (4, 32): 1544.6, (4, 512): 2217.6},
    "torch": {(4, 1): 20427.6, (4, 8): 20185.1, (4, 32): 20203.1, (4, 512): 20767.9,
              (3, 1): 48887.7, (3, 8): 51147.4, (3, 32): 49958.0, (3, 512): 49456.6},
}

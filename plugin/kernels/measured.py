"""Measured speeds of the built-in kernels, the numbers selection ranks them by (KernelSpec.measured_us).

Microseconds per call on the Llama-2-70B layer 8192x28672 (K x N), group 128, act-order, float16, keyed by
(bits, m) with m the rows per call: CUDA-graph replays (launch overhead removed), weights rotated past L2.
From `python bench/kernels.py --bits 4,3 --ms 1,8,32,512 --torch-ref` on one NVIDIA H100 80GB HBM3,
2026-11-27 (run 3 of docs/PERFORMANCE.md; 4-bit m = 1 from run 5, after the half2 decode path; torch timed at
m = 1 only in those runs). bench/kernels.py now prints this table last (add --exllama to time exllamav2's
kernel too). A third-party kernel registers its own numbers in its KernelSpec.
"""

MEASURED_US: dict[str, dict[tuple[int, int], float]] = {
    "triton": {(4, 1): 70.5, (4, 8): 148.4, (4, 32): 165.1, (4, 512): 557.3,
               (3, 1): 74.1, (3, 8): 379.2, (3, 32): 386.9, (3, 512): 619.5},
    "torch": {(4, 1): 5516.0, (3, 1): 13220.0},
    # "exllama": not measured yet (its extension was built on the H100, 126 s, but the session's device time
    # ran out before the benchmark); until it is, selection ranks it by priority, below torch.
}

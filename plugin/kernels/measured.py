"""Measured speeds of the built-in kernels, the numbers selection ranks them by (KernelSpec.measured_us).

Microseconds per call of one Llama-2-70B decoder layer's seven Linears (q and o 8192x8192, k and v
8192x1024, gate and up 8192x28672, down 28672x8192; K x N), group 128, act-order, float16, keyed by
(bits, m) with m the rows per call: CUDA-graph replays (launch overhead removed), weights rotated past L2.
triton, exllama and mma: on an H100 80GB HBM3, 2026-11-28, with `TESTS=none bash bench/gpu_session.sh --bits 4,3
--ms 1,8,32,512 --exllama --cuda --no-triton-paths --no-sweep --no-cuda-sweep` (bench/kernels.py, which prints
this table last; every kernel at its default launch configuration), raw numbers in
bench/results/kernels-full-h100-2026-11-28-0428.{log,json}. torch: the same bench with --torch-ref on the
same card, 2026-11-27 (bench/results/kernels-h100-2026-11-27.json). docs/PERFORMANCE.md has the tables. A
third-party kernel registers its own numbers in its KernelSpec. The CPU kernels are measured on a smaller layer
(below): costs are only compared between kernels measured on the same device type.
"""

MEASURED_US: dict[str, dict[tuple[int, int], float]] = {
    "triton": {
        (4, 1): 319.1,
        (4, 8): 555.3,
        (4, 32): 644.9,
        (4, 512): 2006.6,
        (3, 1): 325.1,
        (3, 8): 1456.1,
        (3, 32): 1503.0,
        (3, 512): 2283.0,
    },
    "exllama": {(4, 1): 241.2, (4, 8): 488.6, (4, 32): 1546.6, (4, 512): 2244.4},
    "mma": {
        (4, 1): 198.9,
        (4, 8): 212.2,
        (4, 32): 385.1,
        (4, 512): 1452.8,
        (3, 1): 180.4,
        (3, 8): 196.4,
        (3, 32): 394.0,
        (3, 512): 1447.2,
    },
    "torch": {
        (4, 1): 20427.6,
        (4, 8): 20185.1,
        (4, 32): 20203.1,
        (4, 512): 20767.9,
        (3, 1): 48887.7,
        (3, 8): 51147.4,
        (3, 32): 49958.0,
        (3, 512): 49456.6,
    },
    # CPU (KernelSpec.measured_on="cpu"): one decoder layer of the embedded default model instead (hidden 576,
    # intermediate 1536, 4-bit asymmetric groups of 32; q/k/v and gate/up fused as the engine runs them), thread CPU
    # time at 1 thread, on an Intel(R) Xeon(R) Processor (Sapphire Rapids class: AVX-512 BF16, AMX), 2026-12-06,
    # with `python bench/cpu_decode.py --kernel-costs`
    "cpu-int4": {(4, 1): 307.7, (4, 512): 56425.3},
    "torch-dense": {(4, 1): 567.6, (4, 512): 25080.0},
}

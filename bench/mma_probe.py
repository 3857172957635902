"""The tensor-core ceiling a fused m = 512 kernel built on mma.sync would face (docs/PERFORMANCE.md):

- mma.sync m16n8k16 (float16 in, float32 accumulate) throughput with registers only (bench/mma_probe.cu), over
  blocks per SM and threads per block;
- fp16 cuBLAS for the four Llama-2-70B shapes at m = 512 and for 8192^3 (cuBLAS uses Hopper's wgmma there);
- the cuda kernel's m = 512 path split into its two launches: dequantize to float16 (TB/s counts the 4-bit read
  and the float16 written, 2.5 bytes a weight), then cuBLAS.

    python bench/mma_probe.py
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.kernels import L2_BYTES, SHAPES, build_layers, time_graph  # noqa: E402
from gptq_bridge.kernels.cuda import build as cuda_build  # noqa: E402

DEV = torch.device("cuda")
M = 512


def main():
    lib = ctypes.CDLL(str(cuda_build.build(source=Path(__file__).with_name("mma_probe.cu"))))
    lib.probe_mma_launch.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 3 + [ctypes.c_void_p]
    sink = torch.zeros(1, dtype=torch.float32, device=DEV)
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    print(f"# {torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}")
    iters = 4096
    best = (0.0, None)
    for per_sm in (1, 2, 4, 8):
        for threads in (128, 256, 512):

            def call(b=per_sm * sms, t=threads):
                assert lib.probe_mma_launch(sink.data_ptr(), b, t, iters, torch.cuda.current_stream().cuda_stream) == 0

            us = time_graph([call], 5)
            flops = 2 * 16 * 8 * 16 * 8 * iters * (threads // 32) * per_sm * sms
            tflops = flops / us / 1e6
            print(
                f"mma.sync chain: {per_sm} blocks/SM x {threads} threads: {us:.0f} us, {tflops:.0f} TFLOPS", flush=True
            )
            best = max(best, (tflops, (per_sm, threads)))
    print(f"mma.sync m16n8k16 ceiling: {best[0]:.0f} TFLOPS at {best[1]}")

    rows = []
    for k, n in SHAPES + [(8192, 8192 * 3)]:
        x = torch.randn(M, k, dtype=torch.float16, device=DEV)
        mats = [
            torch.randn(k, n, dtype=torch.float16, device=DEV) for _ in range(max(2, -(-3 * L2_BYTES // (k * n * 2))))
        ]
        cublas = time_graph([lambda w=w: x @ w for w in mats], 10)
        del mats
        split = ("", "")
        if (k, n) in SHAPES:
            copies = max(2, -(-3 * L2_BYTES // (k * n // 2)))
            _, extra, _, _ = build_layers(k, n, 4, 128, copies, seed=k + n, others=("cuda",))
            mods = extra["cuda"]
            deq = time_graph([lambda t=t: t.dequantize() for t in mods], 10)
            whole = time_graph([lambda t=t: t(x) for t in mods], 10)
            print(
                f"  {k}x{n} dequantize: {deq:.1f} us, {(k * n * 2.5) / deq / 1e6:.2f} TB/s (4-bit read + float16 "
                "written)"
            )
            split = (f"{deq:.1f}", f"{whole:.1f}")
            del extra, mods
        torch.cuda.empty_cache()
        tflops = 2 * M * k * n / cublas / 1e6
        rows.append((k, n, cublas, tflops, split))
        print(
            f"{k}x{n} m={M}: cuBLAS {cublas:.1f} us = {tflops:.0f} TFLOPS; cuda dequantize / whole {split}", flush=True
        )
    print(f"\n## {torch.cuda.get_device_name()}: m = {M}; mma.sync ceiling {best[0]:.0f} TFLOPS")
    print(
        "| K x N | fp16 cuBLAS us | cuBLAS TFLOPS | TFLOPS a fused kernel needs for 1.15x | share of the mma.sync "
        "ceiling | cuda: dequantize us | cuda: whole call us |"
    )
    print("|---|---|---|---|---|---|---|")
    for k, n, cublas, tflops, (deq, whole) in rows:
        need = tflops / 1.15
        print(f"| {k}x{n} | {cublas:.1f} | {tflops:.0f} | {need:.0f} | {need / best[0]:.0%} | {deq} | {whole} |")


if __name__ == "__main__":
    main()

"""How fast can the mma kernel's weights be read at all? (docs/PERFORMANCE.md, the m = 1 target)

Reads the q4mma words of each Llama-2-70B shape with q4_few_rows' grid and load pattern but no arithmetic
(bench/stream_probe.cu), over split counts and unrolls, and the same bytes by bulk copies into shared memory (the
way a copy-engine-fed decode kernel would get them), and prints TB/s of the words read beside the fp16
cuBLAS matrix-vector product of the same shape on the same card (a reference for a plain stream of weights). CUDA-graph replays, copies rotated past L2.

    python bench/stream_probe.py
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.kernels import L2_BYTES, SHAPES, time_graph  # noqa: E402
from gptq_bridge.kernels.cuda import build as cuda_build  # noqa: E402

DEV = torch.device("cuda")


def main():
    lib = ctypes.CDLL(str(cuda_build.build(source=Path(__file__).with_name("stream_probe.cu"))))
    lib.probe_q4mma_launch.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 5 + [ctypes.c_void_p]
    lib.probe_bulk_launch.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 5 + [ctypes.c_void_p]
    sink = torch.zeros(1, dtype=torch.int32, device=DEV)
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    print(f"# {torch.cuda.get_device_name()}, {sms} SMs")
    rows = []
    for k, n in SHAPES:
        tiles, chunks = n // 16, k // 64
        nbytes = tiles * chunks * 512
        copies = max(2, -(-3 * L2_BYTES // nbytes))
        words = [
            torch.randint(-(2**31), 2**31 - 1, (tiles * chunks * 128,), dtype=torch.int32, device=DEV)
            for _ in range(copies)
        ]

        def fastest(launch, split_counts, variants, max_per=None):
            """(us, (splits, variant)) of the fastest launch(words, splits, chunks per split, variant)."""
            found = (float("inf"), None)
            for splits in split_counts:
                per = -(-chunks // splits)
                if max_per is not None and per > max_per:
                    continue
                s = -(-chunks // per)
                for v in variants:

                    def call(w, s=s, p=per, v=v):
                        code = launch(
                            w.data_ptr(),
                            sink.data_ptr(),
                            tiles,
                            chunks,
                            s,
                            p,
                            v,
                            torch.cuda.current_stream().cuda_stream,
                        )
                        assert code == 0, code

                    found = min(found, (time_graph([lambda w=w: call(w) for w in words], 10), (s, v)))
            return found

        best = fastest(lib.probe_q4mma_launch, (1, 2, 4, 8, 16, 32, 64), (2, 4, 8))  # variant: unroll
        bulk = fastest(lib.probe_bulk_launch, (8, 16, 32, 64), (2048, 8192), max_per=16)  # variant: piece bytes
        x = torch.randn(1, k, dtype=torch.float16, device=DEV)
        mats = [
            torch.randn(k, n, dtype=torch.float16, device=DEV) for _ in range(max(2, -(-3 * L2_BYTES // (k * n * 2))))
        ]
        gemv = time_graph([lambda w=w: x @ w for w in mats], 10)
        rows.append((k, n, nbytes, best, bulk, gemv))
        print(
            f"{k}x{n}: probe best {best[0]:.1f} us {best[1]}, bulk copies {bulk[0]:.1f} us {bulk[1]}, "
            f"fp16 gemv {gemv:.1f} us",
            flush=True,
        )
        words = mats = None  # free before the next shape
        torch.cuda.empty_cache()
    print(
        "\n| K x N | q4mma bytes | loads: best us (splits, unroll) | TB/s | bulk copies: best us (splits, piece) "
        "| TB/s | fp16 cuBLAS m=1 TB/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for k, n, nbytes, (us, cfg), (bus, bcfg), gemv in rows:
        print(
            f"| {k}x{n} | {nbytes / 2**20:.0f} MiB | {us:.1f} {cfg} | {nbytes / us / 1e6:.2f} | {bus:.1f} {bcfg} | "
            f"{nbytes / bus / 1e6:.2f} | {k * n * 2 / gemv / 1e6:.2f} |"
        )


if __name__ == "__main__":
    main()

"""Time two builds of the cuda kernel's library on the same layers and check that they compute the same bits:
a baseline (gptq_mma.cu as it is, or --baseline FILE, e.g. an earlier commit's gptq_mma.cu with the same C
interface) and gptq_mma.cu with preprocessor definitions prepended (a variant the source selects by macro).

    python bench/library_ab.py GB_PDL=0 [--bits 4,3] [--ms 1,8,32]
    python bench/library_ab.py --baseline /tmp/q4_mma_HEAD.cu

Prints CUDA-graph microseconds per call for each Llama-2-70B shape, bits and m, alternating the two builds in
the same process (each timed twice) so that the machine's drift falls on both.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.kernels import L2_BYTES, SHAPES, build_layers, disk_bytes, time_graph  # noqa: E402
from gptq_bridge.kernels.cuda import build as cuda_build  # noqa: E402

DEV = torch.device("cuda")


def load(source: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(cuda_build.build(source=source)))
    for name, argtypes in cuda_build._SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, ctypes.c_int
    lib.gb_error_string.argtypes, lib.gb_error_string.restype = [ctypes.c_int], ctypes.c_char_p
    return lib


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("defines", nargs="*", help="NAME=VALUE, prepended to gptq_mma.cu as #define NAME VALUE")
    ap.add_argument("--baseline", type=Path, default=cuda_build.SOURCE, help="source of the baseline build")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--ms", default="1,8,32")
    args = ap.parse_args()
    header = "".join(f"#define {d.partition('=')[0]} {d.partition('=')[2] or 1}\n" for d in args.defines)
    variant_src = Path(tempfile.mkdtemp()) / "q4_mma_variant.cu"
    variant_src.write_text(header + cuda_build.SOURCE.read_text())
    libs = {
        "baseline" if args.baseline != cuda_build.SOURCE else "as it is": load(args.baseline),
        " ".join(args.defines) or "gptq_mma.cu": load(variant_src),
    }
    print(f"# {torch.cuda.get_device_name()}; variant: {header.strip()}")
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        for k, n in SHAPES:
            copies = max(2, math.ceil(3 * L2_BYTES / disk_bytes(k, n, bits, 128)))
            _, extra, _, _ = build_layers(k, n, bits, 128, copies, seed=k + n + bits, others=("cuda",))
            mods = extra["cuda"]
            for m in (int(v) for v in args.ms.split(",")):
                xs = [torch.randn(m, k, device=DEV).half() for _ in mods]
                times = {name: [] for name in libs}
                outs = {}
                for _ in range(2):
                    for name, lib in libs.items():
                        cuda_build._lib = lib
                        outs[name] = mods[0](xs[0])
                        times[name].append(time_graph([lambda t=t, x=x: t(x) for t, x in zip(mods, xs)], 20))
                a, b = outs.values()
                same = torch.equal(a, b)
                rows.append((bits, k, n, m, {name: min(v) for name, v in times.items()}, same))
                print(
                    f"{bits}-bit {k}x{n} m={m}: "
                    + ", ".join(f"{name} {v[0]:.1f}/{v[1]:.1f} us" for name, v in times.items())
                    + f"; same bits: {same}",
                    flush=True,
                )
            del extra, mods
            torch.cuda.empty_cache()
    names = list(libs)
    print(f"\n| bits | K x N | m | {names[0]} us | {names[1]} us | ratio | same bits |\n|---|---|---|---|---|---|---|")
    for bits, k, n, m, t, same in rows:
        print(
            f"| {bits} | {k}x{n} | {m} | {t[names[0]]:.1f} | {t[names[1]]:.1f} | {t[names[1]] / t[names[0]]:.3f} | "
            f"{same} |"
        )


if __name__ == "__main__":
    main()

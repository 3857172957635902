"""The cuda kernel's many-rows path on Hopper (gptq_wgmma.cuh) against what it replaces and what it is held to
(docs/PERFORMANCE.md, the m = 512 target): for the Llama-2-70B shapes (group 128, act-order) and m = 33 ..
512, checks `forward_many_rows` against the float32 reference and times, in CUDA graphs with the weights rotated
past L2:

- wgmma: `forward_many_rows` (gather of x into wgmma's k order + q4_many_rows);
- deq+cuBLAS: the path other GPUs take (dequantize to float16, then cuBLAS);
- cuBLAS fp16: x @ w with an unquantized float16 weight of the same shape.

    python bench/many_rows.py [--bits 4,3] [--ms 33,64,128,256,512] [--shapes all|KxN,...]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.kernels import L2_BYTES, SHAPES, build_layers, disk_bytes, rel, time_graph  # noqa: E402

DEV = torch.device("cuda")


def launch_times(fn, calls=10):
    """'kernel: us, ...' per call, from torch.profiler's CUDA kernel times."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            found = re.search(r"::(\w+)", e.name)
            name = found.group(1) if found else e.name[:40]
            times[name] = times.get(name, 0.0) + e.device_time / calls
    return ", ".join(f"{k}: {v:.1f} us" for k, v in times.items())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--ms", default="33,64,128,256,512")
    ap.add_argument("--shapes", default="all")
    ap.add_argument(
        "--config",
        action="append",
        default=[],
        help="also time this many_rows_config, e.g. ROWS=128 or SPLITS=1 (no tile split); repeatable",
    )
    ap.add_argument("--kernels", action="store_true", help="also print each launch's GPU time (torch.profiler)")
    args = ap.parse_args()
    shapes = SHAPES if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for bits in map(int, args.bits.split(",")):
        for k, n in shapes:
            copies = max(2, math.ceil(3 * L2_BYTES / disk_bytes(k, n, bits, 128)))
            _, extra, ref_w, _ = build_layers(k, n, bits, 128, copies, seed=k + n + bits, others=("cuda",))
            mods = extra["cuda"]
            w16 = [ref_w.half() for _ in range(2)]  # cuBLAS: two float16 copies (each over L2 on the large shapes)
            for m in map(int, args.ms.split(",")):
                xs = [torch.randn(m, k, device=DEV).half() for _ in range(copies)]
                got = mods[0].forward_many_rows(xs[0])
                err = rel(got, xs[0].float() @ ref_w)
                wg = time_graph([lambda t=t, x=x: t.forward_many_rows(x) for t, x in zip(mods, xs)])
                dq = time_graph([lambda t=t, x=x: x @ t.dequantize() for t, x in zip(mods, xs)])
                cb = time_graph([lambda w=w, x=x: x @ w for w, x in zip(w16, xs)])
                for spec in args.config:
                    for t in mods:
                        t.many_rows_config = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in spec.split(",")}
                    alt = time_graph([lambda t=t, x=x: t.forward_many_rows(x) for t, x in zip(mods, xs)])
                    plan = mods[0]._many_rows_plan(m, DEV)
                    for t in mods:
                        t.many_rows_config = None
                    again = time_graph([lambda t=t, x=x: t.forward_many_rows(x) for t, x in zip(mods, xs)])
                    print(
                        f"  {spec}: {alt:.1f} us ({plan}); default plan {mods[0]._many_rows_plan(m, DEV)}: "
                        f"{wg:.1f}, again {again:.1f} us",
                        flush=True,
                    )
                if args.kernels:
                    print("  " + launch_times(lambda: mods[0].forward_many_rows(xs[0])), flush=True)
                tflops = 2 * m * k * n / wg / 1e6
                rows.append((bits, k, n, m, wg, dq, cb, tflops, err))
                print(
                    f"{bits}-bit {k}x{n} m={m}: wgmma {wg:.1f} us ({tflops:.0f} TFLOPS), deq+cuBLAS {dq:.1f}, "
                    f"cuBLAS fp16 {cb:.1f} ({wg / cb:.2f}x), rel err {err:.1e}",
                    flush=True,
                )
            extra = mods = w16 = None  # free before the next shape
            torch.cuda.empty_cache()
    print("\n| bits | K x N | m | wgmma us | TFLOPS | deq + cuBLAS us | cuBLAS fp16 us | wgmma / cuBLAS | rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bits, k, n, m, wg, dq, cb, tf, err in rows:
        print(
            f"| {bits} | {k}x{n} | {m} | **{wg:.1f}** | {tf:.0f} | {dq:.1f} | {cb:.1f} | {wg / cb:.2f}x | {err:.1e} |"
        )


if __name__ == "__main__":
    main()

"""What the scale reads cost the mma kernel at m = 1 (docs/PERFORMANCE.md, the m = 1 target).

Times q4_few_rows on the large Llama-2-70B shapes twice with the same grid: as it runs, and with the group size
passed as 2**30, so that every chunk reads group 0's scales (256 bytes a block, always in L1/L2) instead of
its own group's: the difference is the time the scale traffic costs. (The second result is numerically wrong on
purpose; only its time is used.)

    python bench/scale_probe.py
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.kernels import L2_BYTES, build_layers, disk_bytes, time_graph  # noqa: E402

DEV = torch.device("cuda")


def launch(mod, x, P):
    """One few-rows call of `mod` with the group size the kernel is told set to P."""
    real, mod.slots_per_group = mod.slots_per_group, P
    try:
        mod.forward_few_rows(x)
    finally:
        mod.slots_per_group = real


def main():
    print(f"# {torch.cuda.get_device_name()}")
    print("| K x N | m | as it runs, us | group 0's scales only, us | share of the time |\n|---|---|---|---|---|")
    for k, n in ((8192, 28672), (28672, 8192), (8192, 8192)):
        copies = max(2, math.ceil(3 * L2_BYTES / disk_bytes(k, n, 4, 128)))
        _, extra, _, _ = build_layers(k, n, 4, 128, copies, seed=3, others=("cuda",))
        mods = extra["cuda"]
        for m in (1, 8):
            xs = [torch.randn(m, k, device=DEV).half() for _ in mods]
            real = time_graph([lambda t=t, x=x: launch(t, x, t.slots_per_group) for t, x in zip(mods, xs)], 20)
            flat = time_graph([lambda t=t, x=x: launch(t, x, 2**30) for t, x in zip(mods, xs)], 20)
            print(f"| {k}x{n} | {m} | {real:.1f} | {flat:.1f} | {(real - flat) / real:.0%} |", flush=True)
        del extra, mods
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

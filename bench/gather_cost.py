"""What the activation gather costs an act-order layer on the mma kernel (docs/PERFORMANCE.md).

An act-order checkpoint's rows are sorted by group at load, so each call first gathers x into that order (a
second launch, from the same library call); a layer without act-order reads x as it is. The kernel's own work
is the same for both. This times both layouts of each Llama-2-70B shape in CUDA graphs; the difference is the
gather.

    python bench/gather_cost.py
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.kernels import L2_BYTES, SHAPES, build_layers, disk_bytes, time_graph  # noqa: E402

DEV = torch.device("cuda")


def main():
    print(f"# {torch.cuda.get_device_name()}")
    rows = []
    for k, n in SHAPES:
        copies = max(2, math.ceil(3 * L2_BYTES / disk_bytes(k, n, 4, 128)))
        mods = {
            act: build_layers(k, n, 4, 128, copies, seed=k + n, others=("cuda",), act_order=act)[1]["cuda"]
            for act in (True, False)
        }
        for m in (1, 8):
            xs = [torch.randn(m, k, device=DEV).half() for _ in range(copies)]
            us = {}
            for _ in range(2):  # alternate, keep the better of two
                for act, layers in mods.items():
                    t = time_graph([lambda t=t, x=x: t(x) for t, x in zip(layers, xs)], 20)
                    us[act] = min(us.get(act, float("inf")), t)
            rows.append((k, n, m, us[True], us[False]))
            print(f"{k}x{n} m={m}: act-order {us[True]:.1f} us, in order {us[False]:.1f} us", flush=True)
        del mods
        torch.cuda.empty_cache()
    print(
        "\n| K x N | m | act-order (gather + kernel) us | rows in order (kernel) us | gather |\n|---|---|---|---|---|"
    )
    for k, n, m, a, b in rows:
        print(f"| {k}x{n} | {m} | {a:.1f} | {b:.1f} | {a - b:.1f} us ({(a - b) / a:.0%}) |")


if __name__ == "__main__":
    main()

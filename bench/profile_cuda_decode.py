"""A few calls of the cuda kernel on one Llama-2-70B shape, for Nsight Compute (docs/PERFORMANCE.md):

    ncu --target-processes all -k regex:q4_few_rows --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \\
        --section MemoryWorkloadAnalysis python3 bench/profile_cuda_decode.py [--k 8192 --n 28672]

Builds one random 4-bit g128 act-order layer (bench/kernels.build_layers, which also builds its triton twin)
and calls the cuda module three times at m = 1, then three times at m = 8 (--ms: other row counts; -k
regex:q4_many_rows --ms 512 profiles the many-rows kernel on Hopper), so --launch-skip 2 profiles the third
call of the first m.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.kernels import build_layers  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--ms", default="1,8", help="rows of each group of three calls")
    args = ap.parse_args()
    mod = build_layers(args.k, args.n, 4, 128, 1, seed=0, others=("cuda",))[1]["cuda"][0]
    for m in map(int, args.ms.split(",")):
        x = torch.randn(m, args.k, device="cuda").half()
        for _ in range(3):
            mod(x)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

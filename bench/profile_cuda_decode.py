"""A few calls of the cuda kernel on one Llama-2-70B shape, for Nsight Compute (docs/PERFORMANCE.md):

    ncu --target-processes all -k regex:q4_few_rows --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \\
        --section MemoryWorkloadAnalysis python3 bench/profile_cuda_decode.py [--k 8192 --n 28672]

Builds one random 4-bit g128 act-order layer and calls it three times at m = 1, then three times at m = 8
(so --launch-skip 2 profiles the third m = 1 call).
"""

from __future__ import annotations

import argparse

import torch

from gptq_bridge.config import QuantizeConfig
from gptq_bridge.gptq_layer import IntLayer, group_index, pack_layer
from gptq_bridge.kernels.cuda_gptq import CudaQuantLinear
from gptq_bridge.types import LayerShape


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--n", type=int, default=28672)
    args = ap.parse_args()
    dev = torch.device("cuda")
    k, n = args.k, args.n
    gen = torch.Generator(device=dev).manual_seed(0)
    order = torch.randperm(k, generator=gen, device=dev).cpu()
    layer = IntLayer(q=torch.randint(0, 16, (k, n), generator=gen, device=dev),
                     zeros=torch.randint(1, 16, (k // 128, n), generator=gen, device=dev),
                     scales=torch.rand(k // 128, n, generator=gen, device=dev) * 0.02 + 0.002,
                     g_idx=group_index(k, 128, order).to(dev))
    config = QuantizeConfig(bits=4, group_size=128, desc_act=True)
    mod = CudaQuantLinear(LayerShape(name="profiled", in_features=k, out_features=n), config, torch.float16)
    for key, value in pack_layer(layer, 4, "gptq").items():
        setattr(mod, key, value.half() if value.is_floating_point() else value)
    mod.fill_missing()
    mod.prepare()
    for m in (1, 8):
        x = torch.randn(m, k, device=dev).half()
        for _ in range(3):
            mod(x)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

"""Host (CPU) time of one call of each Triton path and of the cuda kernel, the part a CUDA graph removes:
python bench/host_overhead.py

On a small layer (1024x1024, 4-bit g128 act-order) the GPU work of a call takes a few microseconds, so the
wall time of many back-to-back calls is the Python + launch time per call. Then the torch profiler lists
where that time goes for each path.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import build_layers  # noqa: E402


def per_call_us(fn, calls=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    from gptq_bridge.kernels.cuda.mma import kernel_spec

    others = ("cuda",) if kernel_spec().check_available() is None else ()
    tris, extra, _, _ = build_layers(1024, 1024, 4, 128, 1, seed=1, others=others)
    tri = tris[0]
    rows = []
    for m in (1, 8, 32, 512):
        x = torch.randn(m, 1024, device="cuda").half()
        paths = {"auto": tri, "gemm": tri.forward_gemm, "dequant": tri.forward_dequant}
        if m <= 16:
            paths["decode"] = tri.forward_decode
        if others:
            paths["cuda (forward)"] = extra["cuda"][0]
        for name, fn in paths.items():
            rows.append((m, name, per_call_us(lambda: fn(x))))
    x = torch.randn(8, 1024, device="cuda").half()
    profiled = [("gemm", tri.forward_gemm), ("decode", tri.forward_decode)] + (
        [("cuda", extra["cuda"][0].forward)] if others else []
    )
    for name, fn in profiled:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(200):
                fn(x)
            torch.cuda.synchronize()
        print(f"\n## profile of forward_{name}, m=8, 200 calls (CPU time)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if others:
        rows += cuda_parts(extra["cuda"][0], x)
    print(f"\n## {torch.cuda.get_device_name()}: host microseconds per call (1024x1024 layer, wall of 2000 calls)")
    print("| m | path | us per call |\n|---|---|---|")
    for m, name, us in rows:
        print(f"| {m} | {name} | {us:.1f} |")


def cuda_parts(mod, x):
    """The host steps of one cuda-kernel call at m = 8, each timed on its own (rows of the printed table)."""
    from gptq_bridge.kernels.base import split_k_workspace
    from gptq_bridge.kernels.cuda import build as cuda_build

    lib = cuda_build.library()
    out = torch.empty(8, 1024, dtype=torch.float16, device="cuda")
    splits, per_split, ws_numel = mod._few_rows_plan(8, x.device)
    ws = split_k_workspace(x.device, ws_numel)
    stream = torch.cuda.current_stream().cuda_stream
    xs = torch.empty(8, mod.chunks * 64, dtype=torch.float16, device="cuda")
    args = (
        mod.cu_words.data_ptr(),
        mod.cu_sz.data_ptr(),
        x.data_ptr(),
        1024,
        mod.cu_xidx.data_ptr(),
        xs.data_ptr(),
        None,
        out.data_ptr(),
        ws.data_ptr(),
        mod.cu_counters.data_ptr(),
        4,
        8,
        1024,
        mod.chunks,
        mod.slots_per_group,
        1024,
        splits,
        per_split,
        0,
        stream,
    )
    parts = {
        "torch.cuda.current_stream(dev).cuda_stream": lambda: torch.cuda.current_stream(x.device).cuda_stream,
        "torch._C._cuda_getCurrentRawStream(index)": lambda: torch._C._cuda_getCurrentRawStream(0),
        "torch.empty(8, 1024) on cuda": lambda: torch.empty(8, 1024, dtype=torch.float16, device=x.device),
        "six data_ptr() calls": lambda: (
            x.data_ptr(),
            x.data_ptr(),
            x.data_ptr(),
            x.data_ptr(),
            x.data_ptr(),
            x.data_ptr(),
        ),
        "x.device != module device": lambda: x.device != mod.cu_words.device,
        "ctypes call of gb_q4_few_rows (20 arguments, 2 launches: gather + kernel)": lambda: lib.gb_q4_few_rows(*args),
        "ctypes call without a launch, 1 argument (gb_error_string)": lambda: lib.gb_error_string(0),
        "cuda forward_few_rows, whole": lambda: mod.forward_few_rows(x),
        "cuda forward, whole": lambda: mod(x),
    }
    return [(8, f"cuda part: {name}", per_call_us(fn, 20000)) for name, fn in parts.items()]


if __name__ == "__main__":
    main()

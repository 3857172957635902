"""Kernel micro-benchmark for the Llama-2-70B layer shapes (run on the GPU): python bench/kernels.py

For each shape (K x N) and m = 1, 8, 32, 512, 4-bit g128 act-order (and 3-bit), it builds random layers,
checks every path against a float32 reference, then times (median of triton.testing.do_bench, CUDA events)
rotating over enough layer copies and inputs that the weights cannot sit in L2 (50 MB on the H100):
- triton: the path forward() picks, plus each path on its own (decode, gemm, dequant + cuBLAS);
- fp16 cuBLAS (x @ W, W fp16) for the same shape;
- torch: the reference kernel (dequantize + matmul) (--torch-ref);
- exllama: exllamav2's GPTQ kernel through gptq-bridge's `exllama` module, 4-bit only (--exllama; its
  extension compiles at first import, ~2 minutes on the H100, unless a built `exllamav2_ext` is importable).
Times are reported eagerly (each call launched from Python, as do_bench does) and from a CUDA graph
replaying all copies (launch overhead removed). Effective TB/s counts the on-disk bytes of qweight, scales
and qzeros. Prints a short table last, then the 8192x28672 numbers in the form of gptq_bridge/kernels/measured.py
(the table selection ranks kernels by); --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = [(8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192)]
# the Linears a decode step runs once q/k/v and gate/up are fused at load (fusion.py): qkv, o, gate_up, down
SHAPE_SETS = {
    "all": SHAPES,
    "7b": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)],
    "13b": [(5120, 15360), (5120, 5120), (5120, 27648), (13824, 5120)],
    "70b-fused": [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)],
}
LAYER_70B = {(8192, 8192): 2, (8192, 1024): 2, (8192, 28672): 2, (28672, 8192): 1}  # Linears of one decoder layer
MS = [1, 8, 32, 512]
L2_BYTES = 50 * 2**20
DEV = torch.device("cuda")


def disk_bytes(k, n, bits, group_size):
    groups = -(-k // group_size)
    return k * n * bits // 8 + groups * n * 2 + groups * n * bits // 8


def build_layers(k, n, bits, group_size, copies, seed, others=(), act_order=True):
    """(triton modules, {other kernel: modules}, float32 reference weight, torch module); the copies differ."""
    from gptq_bridge.config import QuantizeConfig
    from gptq_bridge.kernels.torch_ref import TorchQuantLinear
    from gptq_bridge.kernels.triton_gptq import TritonQuantLinear
    from gptq_bridge.quantize.gptq_layer import IntLayer, group_index, pack_layer
    from gptq_bridge.types import LayerShape

    gen = torch.Generator(device=DEV).manual_seed(seed)
    config = QuantizeConfig(bits=bits, group_size=group_size, desc_act=act_order, sym=False, checkpoint_format="gptq")
    shape = LayerShape(name="bench", in_features=k, out_features=n)
    maxq = 2**bits - 1
    groups = -(-k // group_size)
    from gptq_bridge.kernels.cuda.mma import CudaQuantLinear
    from gptq_bridge.kernels.exllama import ExllamaQuantLinear

    classes = {"exllama": ExllamaQuantLinear, "cuda": CudaQuantLinear}
    tris, extra, ref_weight, torch_mod = [], {name: [] for name in others}, None, None
    for c in range(copies):
        order = torch.randperm(k, generator=gen, device=DEV).cpu() if act_order else None
        g_idx = group_index(k, group_size, order).to(DEV)
        layer = IntLayer(
            q=torch.randint(0, maxq + 1, (k, n), generator=gen, device=DEV),
            zeros=torch.randint(1, maxq + 1, (groups, n), generator=gen, device=DEV),
            scales=torch.rand(groups, n, generator=gen, device=DEV) * 0.02 + 0.002,
            g_idx=g_idx,
        )
        tensors = pack_layer(layer, bits, "gptq")
        del layer
        if c == 0:
            torch_mod = TorchQuantLinear(shape, config, torch.float16)
            for key, v in tensors.items():
                setattr(torch_mod, key, v.half() if v.is_floating_point() else v.clone())
            torch_mod.fill_missing()
            ref_weight = torch_mod.weight(torch.float32)
        tri = TritonQuantLinear(shape, config, torch.float16)
        for key, v in tensors.items():
            setattr(tri, key, v.half() if v.is_floating_point() else v)
        tri.fill_missing()
        tri.prepare()
        tris.append(tri)
        for name in others:
            mod = classes[name](shape, config, torch.float16)
            for key, v in tensors.items():
                setattr(mod, key, v.half() if v.is_floating_point() else v.clone())
            mod.fill_missing()
            mod.prepare()
            extra[name].append(mod)
        del tensors
    return tris, extra, ref_weight, torch_mod


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def time_eager(fns, reps_ms=200):
    """Median microseconds per call of fns[i % len(fns)], each call launched from Python (CUDA events)."""
    import triton

    state = {"i": 0}

    def step():
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    return triton.testing.do_bench(step, warmup=25, rep=reps_ms, return_mode="median") * 1000


def time_graph(fns, replays=20):
    """Microseconds per call when all fns are captured in one CUDA graph (no launch overhead), median replay."""
    for f in fns:  # warm up (compile) outside the capture
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
        with torch.cuda.graph(g, stream=stream):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1000 / len(fns))
    times.sort()
    return times[len(times) // 2]


def sweep(tris, xs, attr, path, configs):
    """Time `path` under each launch config (set as tris[i].<attr>), keep the fastest on the layers. Timed in a
    CUDA graph: eagerly, the host time of a launch (~45 us on the H100 machine) hides the GPU time of the
    smaller shapes."""
    results = []
    for cfg in configs:
        for t in tris:
            setattr(t, attr, cfg)
        try:
            us = time_graph([lambda t=t, x=x: getattr(t, path)(x) for t, x in zip(tris, xs)], 10)
        except Exception as exc:  # e.g. a config needing more shared memory than the card has
            print(f"  config {cfg} failed: {type(exc).__name__}", flush=True)
            us = float("inf")
        results.append((us, cfg))
    best = min(results, key=lambda r: r[0])
    for t in tris:
        setattr(t, attr, best[1])
    return best, results


DECODE_CONFIGS = [{"BLOCK_N": bn, "num_warps": nw} for bn in (256, 512, 1024, 2048) for nw in (4, 8)]
GEMM_SMALL_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw}
    for bn, bk, nw in ((64, 64, 4), (128, 64, 4), (128, 128, 4), (256, 64, 8))
]
CUDA_CONFIGS = [None] + [{"SPLITS": s} for s in (1, 2, 4, 8, 16, 32, 64)]
DEQUANT_CONFIGS = [
    {"BLOCK_K": bk, "BLOCK_N": bn, "num_warps": nw}
    for bk, bn, nw in ((64, 256, 4), (128, 256, 8), (32, 512, 4), (64, 512, 8))
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument(
        "--shapes",
        default="all",
        help="KxN list, or sets: all (70B unfused), 7b, 13b, 70b-fused (q/k/v, gate/up fused)",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-decode-up-to", type=int, default=16, help="sweep decode configs for m up to this")
    ap.add_argument("--sweep-gemm-up-to", type=int, default=32, help="sweep small-m gemm configs up to this m")
    ap.add_argument("--sweep-dequant", action="store_true")
    ap.add_argument("--torch-ref", action="store_true", help="also time the pure-PyTorch kernel")
    ap.add_argument("--exllama", action="store_true", help="also time exllamav2's kernel (4-bit)")
    ap.add_argument("--cuda", action="store_true", help="also time gptq-bridge's CUDA kernel (3- and 4-bit)")
    ap.add_argument("--no-cuda-sweep", action="store_true", help="time the cuda kernel's default split count only")
    ap.add_argument("--no-triton-paths", action="store_true", help="time only triton's auto path, not each path")
    args = ap.parse_args()

    import triton

    torch.manual_seed(0)
    dev_name = torch.cuda.get_device_name()
    print(
        f"# {dev_name}, torch {torch.__version__}, triton {triton.__version__}, {time.strftime('%Y-%m-%d %H:%M')}",
        flush=True,
    )
    shapes = [
        shape for name in args.shapes.split(",") for shape in SHAPE_SETS.get(name) or [tuple(map(int, name.split("x")))]
    ]
    ms = [int(m) for m in args.ms.split(",")]
    rows = []
    t_start = time.time()
    for bits in [int(b) for b in args.bits.split(",")]:
        for k, n in shapes:
            nbytes = disk_bytes(k, n, bits, 128)
            copies = max(2, min(24, math.ceil(3 * L2_BYTES / nbytes)))
            others = [
                name
                for name, on, kernel_bits in (("exllama", args.exllama, (4,)), ("cuda", args.cuda, (3, 4)))
                if on and bits in kernel_bits
            ]
            tris, extra, ref_w, torch_mod = build_layers(k, n, bits, 128, copies, seed=k * 7 + n + bits, others=others)
            w16 = ref_w.half()
            fp16_copies = max(2, min(8, math.ceil(3 * L2_BYTES / (k * n * 2))))
            w16s = [w16] + [w16.clone() for _ in range(fp16_copies - 1)]
            swept = set()
            for m in ms:
                xs = [torch.randn(m, k, device=DEV).half() for _ in range(copies)]
                want = xs[0].float() @ ref_w
                paths = {
                    "auto": lambda t, x: t(x),
                    "gemm": lambda t, x: t.forward_gemm(x),
                    "dequant": lambda t, x: t.forward_dequant(x),
                }
                if m <= 16:
                    paths["decode"] = lambda t, x: t.forward_decode(x)
                if args.no_triton_paths:
                    paths = {"auto": paths["auto"]}
                for t in tris:  # each m starts from the module's own defaults
                    t.decode_config = t.gemm_config = t.dequant_config = None
                if not args.no_sweep:
                    row_sweeps = []
                    if m <= args.sweep_decode_up_to and m not in swept:
                        row_sweeps.append(("decode_config", "forward_decode", DECODE_CONFIGS))
                    if 1 < m <= args.sweep_gemm_up_to:
                        row_sweeps.append(
                            (
                                "gemm_config",
                                "forward_gemm",
                                [dict(c, BLOCK_M=max(16, c["BLOCK_M"] if m <= 16 else 32)) for c in GEMM_SMALL_CONFIGS],
                            )
                        )
                    if m >= 256 and "dequant" not in swept and args.sweep_dequant:
                        row_sweeps.append(("dequant_config", "forward_dequant", DEQUANT_CONFIGS))
                        swept.add("dequant")
                    for attr, path, configs in row_sweeps:
                        (us, cfg), results = sweep(tris, xs, attr, path, configs)
                        swept.add(m)
                        print(
                            f"  sweep {path} {k}x{n} {bits}-bit m={m}: best {cfg} {us:.1f} us; all "
                            + ", ".join(f"{r[0]:.0f}" for r in results),
                            flush=True,
                        )
                if "cuda" in extra and m <= 32 and not args.no_cuda_sweep:
                    (us, cfg), results = sweep(extra["cuda"], xs, "few_rows_config", "forward", CUDA_CONFIGS)
                    print(
                        f"  sweep cuda {k}x{n} m={m}: best {cfg} {us:.1f} us; all "
                        + ", ".join(f"{r[0]:.0f}" for r in results),
                        flush=True,
                    )
                row = {"bits": bits, "k": k, "n": n, "m": m, "bytes": nbytes, "device": dev_name}
                for name, fn in paths.items():
                    out = fn(tris[0], xs[0])
                    err = rel(out, want)
                    calls = [lambda t=t, x=x, fn=fn: fn(t, x) for t, x in zip(tris, xs)]
                    row[f"{name}_err"] = err
                    row[f"{name}_us"] = time_eager(calls)
                    row[f"{name}_graph_us"] = time_graph(calls)
                xs16 = [xs[i % copies] for i in range(fp16_copies)]
                err = rel(xs16[0] @ w16s[0], want)
                row["cublas_err"] = err
                calls = [lambda x=x, w=w: x @ w for x, w in zip(xs16, w16s)]
                row["cublas_us"] = time_eager(calls)
                row["cublas_graph_us"] = time_graph(calls)
                if args.torch_ref:
                    row["torch_err"] = rel(torch_mod(xs[0]), want)
                    row["torch_us"] = time_eager([lambda: torch_mod(xs[0])], 100)
                    try:
                        row["torch_graph_us"] = time_graph([lambda: torch_mod(xs[0])], 5)
                    except RuntimeError as exc:  # not capturable: keep the eager time only
                        print(f"  torch kernel not graph-capturable: {exc}", flush=True)
                for name, mods in extra.items():
                    row[f"{name}_err"] = rel(mods[0](xs[0]), want)
                    calls = [lambda t=t, x=x: t(x) for t, x in zip(mods, xs)]
                    row[f"{name}_us"] = time_eager(calls)
                    row[f"{name}_graph_us"] = time_graph(calls)
                row["tbps"] = nbytes / (row["auto_us"] * 1e-6) / 1e12
                row["tbps_graph"] = nbytes / (row["auto_graph_us"] * 1e-6) / 1e12
                rows.append(row)
                print(
                    json.dumps({key: (round(v, 4) if isinstance(v, float) else v) for key, v in row.items()}),
                    flush=True,
                )
            tris = extra = ref_w = torch_mod = w16 = w16s = None  # free before the next shape
            torch.cuda.empty_cache()
            print(f"  [{time.time() - t_start:.0f}s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)

    print(f"\n## {dev_name}: microseconds per call (median; eager / CUDA graph), effective TB/s of the chosen path")
    print(
        "| bits | K x N | m | triton auto | decode | gemm | dequant+cuBLAS | exllama | cuda | fp16 cuBLAS | TB/s triton "
        "| TB/s exllama | TB/s cuda | torch | max rel err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:

        def cell(p):
            return f"{r[p + '_us']:.1f} / {r[p + '_graph_us']:.1f}" if p + "_us" in r else ""

        errs = max(v for key, v in r.items() if key.endswith("_err") and key != "cublas_err")

        def tbps(p):
            return f"{r['bytes'] / (r[p + '_graph_us'] * 1e-6) / 1e12:.2f}" if p + "_us" in r else ""

        print(
            f"| {r['bits']} | {r['k']}x{r['n']} | {r['m']} | {cell('auto')} | {cell('decode')} | {cell('gemm')} | "
            f"{cell('dequant')} | {cell('exllama')} | {cell('cuda')} | {cell('cublas')} | "
            f"{r['tbps']:.2f} / {r['tbps_graph']:.2f} | {tbps('exllama')} | {tbps('cuda')} | {cell('torch')} | "
            f"{errs:.1e} |"
        )

    # The selection table (gptq_bridge/kernels/measured.py): CUDA-graph microseconds of one Llama-2-70B decoder
    # layer's seven Linears (q, o: 8192x8192; k, v: 8192x1024; gate, up: 8192x28672; down: 28672x8192)
    table = {}
    for kernel, key in (
        ("triton", "auto_graph_us"),
        ("exllama", "exllama_graph_us"),
        ("mma", "cuda_graph_us"),
        ("torch", "torch_graph_us"),
    ):
        for bits in sorted({r["bits"] for r in rows}, reverse=True):
            for m in sorted({r["m"] for r in rows}):
                got = {(r["k"], r["n"]): r[key] for r in rows if r["bits"] == bits and r["m"] == m and key in r}
                if set(got) == set(LAYER_70B):
                    table.setdefault(kernel, {})[(bits, m)] = round(sum(n * got[s] for s, n in LAYER_70B.items()), 1)
    print(f"\n# measured.py, {dev_name}, {time.strftime('%Y-%m-%d')} (needs all four shapes)\nMEASURED_US = {table!r}")


if __name__ == "__main__":
    main()

"""Where batch-1 decode loses time between graphed steps: the GPU's idle gaps, and any call that waits for it.

    python bench/engine_gaps.py [--shape 7b] [--new 64] [--out gaps.json]

Writes a random-weight checkpoint with bench/decode.py's writer, loads it, warms the engine up, then streams one
greedy request twice:
1. with torch's CUDA sync debug mode on ("warn"): every call that makes the host wait for the GPU is reported
   with its stack (the engine should have one a step: reading the previous step's tokens);
2. under the torch profiler: the GPU's timeline of that stream. It prints the time per token, the GPU's busy
   time per token (kernels and copies), the idle gaps between them by size, and the largest gaps with the
   operations on either side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # bench/kernels.py shadows `kernels`
sys.path.append(str(HERE.parent))  # `from bench import decode`: its checkpoint writer and prompts

import torch  # noqa: E402


def gpu_timeline(trace: dict) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every kernel, copy and fill on the GPU, in start order."""
    spans = [
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in trace["traceEvents"]
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    return sorted(spans)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import gptq_bridge
    from bench import decode

    work = Path(tempfile.mkdtemp(prefix="gptq-bridge-gaps-"))
    path = decode.random_checkpoint(args.shape, work / args.shape)
    lm = gptq_bridge.load_model(str(path))
    vocab = decode.SHAPES[args.shape][5]
    text = decode.prompt(384, vocab, 385)
    decode.stream_times(lm, text, 16)  # warm-up: the engine, its graphs, kernel configurations

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            decode.stream_times(lm, text, args.new)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = Counter(str(w.message).splitlines()[0][:160] for w in caught)
    print(f"calls that waited for the GPU during {args.new} tokens:", flush=True)
    for what, n in syncs.most_common(12):
        print(f"  {n:5d}  {what}")

    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        start, arrivals = decode.stream_times(lm, text, args.new)
    trace_file = work / "trace.json"
    prof.export_chrome_trace(str(trace_file))
    spans = gpu_timeline(json.loads(trace_file.read_text()))
    # the steady stretch: from the 8th span after the first decode graph to the end
    wall_ms = 1000 * (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
    first, last = spans[0][0], spans[-1][1]
    busy = sum(e - s for s, e, _ in spans)
    gaps = [(spans[i + 1][0] - spans[i][1], spans[i][2], spans[i + 1][2]) for i in range(len(spans) - 1)]
    sizes = Counter(
        "<2us" if g < 2 else "2-10us" if g < 10 else "10-50us" if g < 50 else "50-200us" if g < 200 else ">=200us"
        for g, _, _ in gaps
    )
    tokens = len(arrivals)
    report = {
        "device": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "bench/engine_gaps.py"] + sys.argv[1:]),
        "shape": args.shape,
        "ms_per_token_streamed": round(wall_ms, 3),
        "gpu_span_ms_per_token": round((last - first) / 1000 / tokens, 3),
        "gpu_busy_ms_per_token": round(busy / 1000 / tokens, 3),
        "gpu_ops_per_token": round(len(spans) / tokens, 1),
        "gap_sizes": dict(sizes),
        "idle_ms_per_token_in_gaps_over_10us": round(sum(g for g, _, _ in gaps if g >= 10) / 1000 / tokens, 3),
        "largest_gaps_us": [[round(g, 1), a[:60], b[:60]] for g, a, b in sorted(gaps, reverse=True)[:12]],
        "syncs": dict(syncs),
    }
    print(json.dumps(report, indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

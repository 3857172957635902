"""Draw the figures in docs/img/ from the JSON results in bench/results/: python bench/plot.py

- kernel-bandwidth-4bit.png, kernel-bandwidth-3bit.png: TB/s against rows per call for each kernel on the
  Llama-2-70B layer shapes (bench/kernels.py's newest full run, kernels-full-*.json);
- decode-vs-peers.png: end-to-end decode against exllamav2 and transformers, and tokens/s by concurrent calls
  (bench/decode.py's newest H100 run of 7B and 13B with exllamav2, decode-engine-h100-*.json);
- perplexity-vs-gptqmodel.png: quantizer quality against GPTQModel by setting (quality-*.json).

Needs matplotlib (pip install -e ".[bench]"). Every number drawn comes from those files.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
IMG = ROOT / "docs" / "img"

# bench/kernels.py's JSON keys -> legend labels; "auto" is the path the triton kernel's forward() picks.
KERNELS = [
    ("cuda", "gptq-bridge cuda"),
    ("exllama", "exllamav2 0.3.2"),
    ("auto", "gptq-bridge triton"),
    ("cublas", "fp16 cuBLAS (dense)"),
]
STYLE = {
    "cuda": {"color": "C0", "marker": "o"},
    "exllama": {"color": "C1", "marker": "s"},
    "auto": {"color": "C2", "marker": "^"},
    "cublas": {"color": "0.3", "marker": "x", "linestyle": "--"},
}
SHAPE_NAMES = {(8192, 8192): "q, o", (8192, 1024): "k, v", (8192, 28672): "gate, up", (28672, 8192): "down"}


def newest(pattern: str) -> Path:
    files = sorted(RESULTS.glob(pattern))
    if not files:
        sys.exit(f"plot.py: no {pattern} in {RESULTS}")
    return files[-1]


def run_stamp(json_path: Path) -> str:
    """The date and time bench/kernels.py wrote in the first line of the log beside the JSON."""
    log = json_path.with_suffix(".log")
    if log.is_file():
        m = re.search(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2})", log.read_text().splitlines()[0])
        if m:
            return m.group(1) + " UTC"
    m = re.search(r"(\d{4}-\d{2}-\d{2})", json_path.name)
    return m.group(1) if m else "date unknown"


def plot_bandwidth(path: Path, bits: int) -> Path:
    rows = [r for r in json.loads(path.read_text()) if r["bits"] == bits]
    shapes = list(dict.fromkeys((r["k"], r["n"]) for r in rows))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for ax, (k, n) in zip(axes.flat, shapes):
        shape_rows = sorted((r for r in rows if (r["k"], r["n"]) == (k, n)), key=lambda r: r["m"])
        for key, label in KERNELS:
            pts = [(r["m"], r[f"{key}_graph_us"]) for r in shape_rows if r.get(f"{key}_graph_us")]
            if not pts:
                continue
            # quantized kernels: the checkpoint's bytes (weights, scales, zeros); cuBLAS: its float16 weight
            nbytes = {r["m"]: (k * n * 2 if key == "cublas" else r["bytes"]) for r in shape_rows}
            ms = [m for m, _ in pts]
            ax.plot(ms, [nbytes[m] / us / 1e6 for m, us in pts], label=label, **STYLE[key])
        ax.set_title(f"K x N = {k}x{n} ({SHAPE_NAMES.get((k, n), '')})")
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["m"] for r in shape_rows])
        ax.set_xticklabels([str(r["m"]) for r in shape_rows])
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("rows per call (m)")
    for ax in axes[:, 0]:
        ax.set_ylabel("weight bytes read, TB/s")
    axes[0, 0].legend(loc="upper right", fontsize=9)
    device = rows[0]["device"]
    fig.suptitle(
        f"{bits}-bit g128 act-order GEMM, Llama-2-70B layer shapes, CUDA graph\n"
        f"{device}, {run_stamp(path)} ({path.name})",
        fontsize=12,
    )
    fig.text(
        0.5,
        0.005,
        "TB/s = bytes of the weight / time: the 4-bit or 3-bit checkpoint tensors for the "
        "quantized kernels, the float16 weight for cuBLAS.\nAt 512 rows the kernels are "
        "compute-bound: compare their times there (docs/PERFORMANCE.md), not TB/s.",
        ha="center",
        fontsize=8.5,
        color="0.3",
    )
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    out = IMG / f"kernel-bandwidth-{bits}bit.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def bars(ax, labels, values, colors, fmt):
    b = ax.bar(labels, values, color=colors)
    for rect, v in zip(b, values):
        ax.annotate(
            fmt.format(v),
            (rect.get_x() + rect.get_width() / 2, rect.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_ylim(0, max(values) * 1.18)
    ax.grid(True, axis="y", alpha=0.3)
    ax.tick_params(axis="x", labelsize=9)


def decode_results() -> Path:
    """The newest bench/decode.py run of the 7B and 13B shapes with exllamav2 beside gptq-bridge."""
    runs = [
        f
        for f in sorted(RESULTS.glob("decode-engine-h100-*.json"))
        if {"7b", "13b"} <= set(res := json.loads(f.read_text())["results"])
        and all({"gptq_bridge", "exllamav2"} <= set(r) for r in res.values())
    ]
    if not runs:
        sys.exit(f"plot.py: no decode-engine-h100-*.json of 7B and 13B with exllamav2 in {RESULTS}")
    return runs[-1]


def plot_decode(path: Path) -> Path:
    d = json.loads(path.read_text())
    res = d["results"]
    shapes = list(res)
    who = [
        ("gptq_bridge", "gptq-bridge", "C0"),
        ("exllamav2", "exllamav2 0.3.2", "C1"),
        ("transformers_fp16_eager", "transformers fp16 eager", "0.5"),
    ]
    who = [w for w in who if all(w[0] in res[shape] for shape in shapes)]  # the peers this run measured
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.8))
    groups = [(shape, ctx) for shape in shapes for ctx in (512, 4096)]
    width = 0.27
    for i, (key, label, color) in enumerate(who):
        vals = [res[shape][key].get(f"decode_tok_s_ctx{ctx}", 0.0) for shape, ctx in groups]
        xs = [j + (i - (len(who) - 1) / 2) * width for j in range(len(groups))]
        b = left.bar(xs, vals, width, label=label, color=color)
        for rect, v in zip(b, vals):
            left.annotate(
                f"{v:.0f}",
                (rect.get_x() + rect.get_width() / 2, v),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
    left.set_xticks(range(len(groups)))
    left.set_xticklabels([f"{shape.upper()}\ncontext {ctx}" for shape, ctx in groups], fontsize=9)
    left.set_ylabel("tokens/s, one stream (higher is better)")
    left.set_title("Batch-1 decode", fontsize=10)
    left.grid(True, axis="y", alpha=0.3)
    left.legend(fontsize=8.5)
    for shape, marker in zip(shapes, "os^"):
        ours = res[shape]["gptq_bridge"]
        streams = sorted(int(k.removeprefix("streams")) for k in ours if k.startswith("streams"))
        right.plot(
            streams,
            [ours[f"streams{n}"]["aggregate_tok_s"] for n in streams],
            marker=marker,
            label=f"gptq-bridge, {shape.upper()}",
        )
    right.set_xscale("log", base=2)
    right.set_xticks(streams)
    right.set_xticklabels([str(n) for n in streams])
    right.set_xlabel("concurrent generate() calls (128 prompt + 128 new tokens each)")
    right.set_ylabel("tokens/s, all streams together")
    right.set_title("Continuous batching", fontsize=10)
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8.5)
    fig.suptitle(
        f"End to end through lm.generate, 4-bit g128 act-order (random weights)\n"
        f"{d['device']}, {d['date']} ({path.name})",
        fontsize=11,
    )
    fig.tight_layout()
    out = IMG / "decode-vs-peers.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_quality(path: Path) -> Path:
    d = json.loads(path.read_text())
    settings = list(d["settings"])
    series = [
        ("gptqmodel_7.6.0", "GPTQModel 7.6.0", "C1"),
        ("gptq_bridge_no_fp_targets", "gptq-bridge, plain GPTQ (--no-fp-targets)", "C9"),
        ("gptq_bridge_default", "gptq-bridge, default (fp-targets)", "C0"),
    ]
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.26
    for i, (key, label, color) in enumerate(series):
        xs = [j + (i - 1) * width for j in range(len(settings))]
        vals = [d["settings"][s][key] for s in settings]
        b = ax.bar(xs, vals, width, label=label, color=color)
        for rect, v in zip(b, vals):
            ax.annotate(
                f"{v:.2f}",
                (rect.get_x() + rect.get_width() / 2, v),
                ha="center",
                va="bottom",
                fontsize=8.5,
                xytext=(0, 2),
                textcoords="offset points",
            )
    fp32 = d["settings"][settings[0]]["fp32"]
    ax.axhline(fp32, color="0.2", linestyle=":", linewidth=1.2, label=f"float32 model ({fp32:.2f})")
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels(settings)
    ax.set_ylabel("perplexity on held-out text (lower is better)")
    ax.set_ylim(0, max(d["settings"][s][k] for s in settings for k, _, _ in series) * 1.15)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.suptitle(
        f"GPTQ quality, SmolLM2-135M-Instruct, GNU GPL 3 as held-out text\n{d['machine']}, {d['date']} ({path.name})",
        fontsize=11,
    )
    fig.tight_layout()
    out = IMG / "perplexity-vs-gptqmodel.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", type=Path, help="a bench/kernels.py JSON (default: the newest kernels-full-*.json)")
    ap.add_argument("--decode", type=Path, help="default: the newest decode-engine-*.json with every peer")
    ap.add_argument("--quality", type=Path, help="default: the newest quality-*.json")
    args = ap.parse_args(argv)
    plt.switch_backend("Agg")  # files only, no display needed
    IMG.mkdir(parents=True, exist_ok=True)
    kernels = args.kernels or newest("kernels-full-*.json")
    for out in (
        plot_bandwidth(kernels, 4),
        plot_bandwidth(kernels, 3),
        plot_decode(args.decode or decode_results()),
        plot_quality(args.quality or newest("quality-*.json")),
    ):
        print(out.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

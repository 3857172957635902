"""Peak host memory of `gptq-bridge quantize` against the size of the float16 model (the goal: well under 2x).

Builds a random-weight float16 Llama directory of the size asked for (with the tests' word-level tokenizer),
then runs, each in a fresh process so each peak is its own:
- `baseline`: import gptq_bridge + transformers and load the float16 model, nothing else;
- `quantize`: the CLI, 4-bit g128 act-order: the default (fp-targets); the same with glibc's default
  allocation behaviour instead of the quantizer's heap policy (`_heap_policy`: the heap reuse of narrow
  models, the fixed mmap threshold of wide ones); and --no-fp-targets.
Prints the peak resident memory of each (getrusage of the child), the load average around it, and the
quantizer's peak over the float16 model's size, with and without the part the baseline already needs
(runtime + the model itself). Since `quantize` reads the source one block at a time, the baseline (which
loads the whole model) is no longer a lower bound of the quantizer's peak.

    python bench/quantize_memory.py --size small                     # hidden 1536, MLP 4096, 8 blocks: 433 MiB
    python bench/quantize_memory.py --size 7b --layers 8 --runs default   # Llama-2-7B's block shape, 8 blocks
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {  # name: (hidden, intermediate, default number of blocks)
    "small": (1536, 4096, 8),
    "medium": (2048, 5504, 16),
    "7b": (4096, 11008, 8),  # Llama-2-7B's block: 202M parameters, 386 MiB in float16
}
RUNS = ("baseline", "default", "no-heap-reuse", "no-fp-targets")


def build_model(out: Path, hidden: int, intermediate: int, layers: int) -> int:
    """A random float16 Llama in `out`; returns the bytes of its weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_checkpoints import tiny_tokenizer

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=96,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(str(out))
    tiny_tokenizer(96).save_pretrained(str(out))
    return sum(p.numel() * p.element_size() for p in model.parameters())


def peak_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in bytes, wall seconds) of one child process."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed:\n{proc.stderr[-2000:]}")
    return int(proc.stdout.strip().splitlines()[-1].split()[1]), wall


def child(argv: list[str]) -> list[str]:
    return [sys.executable, __file__, "--child", *argv]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=list(SIZES), default="small", help="block shape (and number of blocks)")
    ap.add_argument("--hidden", type=int, default=None, help="override the size's hidden width")
    ap.add_argument("--intermediate", type=int, default=None, help="override the size's MLP width")
    ap.add_argument("--layers", type=int, default=None, help="override the size's number of blocks")
    ap.add_argument(
        "--runs",
        nargs="+",
        choices=RUNS,
        default=list(RUNS),
        help="which processes to measure (each is its own process)",
    )
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptq-bridge-memory"))
    ap.add_argument("--child", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.child is not None:  # one measured process: prints its own peak RSS last
        kind, *rest = args.child
        rc = 0
        if kind == "build":  # in its own process, so the parent does not keep the float32 model's memory
            print(f"SIZE {build_model(Path(rest[0]), *map(int, rest[1:]))}")
            raise SystemExit(0)
        if kind == "baseline":
            from transformers import AutoModelForCausalLM

            import gptq_bridge  # noqa: F401

            AutoModelForCausalLM.from_pretrained(rest[0], dtype="auto")
        else:
            import contextlib

            import gptq_bridge.quantize.pipeline as pipeline
            from gptq_bridge.cli import main as cli_main

            if kind == "quantize-no-heap-reuse":  # glibc's default allocation behaviour, for comparison
                pipeline.heap_policy = lambda *a, **k: contextlib.nullcontext()
            rc = cli_main(["quantize", *rest])
        print(f"PEAK_RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}")
        raise SystemExit(rc)

    hidden, intermediate, layers = SIZES[args.size]
    args.hidden = args.hidden or hidden
    args.intermediate = args.intermediate or intermediate
    args.layers = args.layers or layers
    shutil.rmtree(args.work, ignore_errors=True)
    src = args.work / "fp16"
    built = subprocess.run(
        child(["build", str(src), str(args.hidden), str(args.intermediate), str(args.layers)]),
        capture_output=True,
        text=True,
        check=True,
    )
    size = int(built.stdout.strip().splitlines()[-1].split()[1])
    random.seed(0)
    words = "the a of to and in is it you that he was for on are with as I his they be at one have this from".split()
    text = args.work / "calibration.txt"
    text.write_text(" ".join(random.choice(words) for _ in range(args.nsamples * args.seq_len * 2)))
    print(
        f"float16 model: {size / 2**20:.0f} MiB ({args.layers} layers, hidden {args.hidden}, MLP {args.intermediate})",
        flush=True,
    )
    commit = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    rows = []
    quantize_args = [
        "--bits",
        "4",
        "--group-size",
        "128",
        "--desc-act",
        "--dataset",
        str(text),
        "--nsamples",
        str(args.nsamples),
        "--seq-len",
        str(args.seq_len),
    ]
    for run in args.runs:
        load = os.getloadavg()[0]
        if run == "baseline":
            peak, wall = peak_of(child(["baseline", str(src)]))
            name = "import + load the whole fp16 model (transformers)"
        else:
            kind = "quantize-no-heap-reuse" if run == "no-heap-reuse" else "quantize"
            mode = "--no-fp-targets" if run == "no-fp-targets" else "--fp-targets"
            peak, wall = peak_of(child([kind, str(src), str(args.work / f"q-{run}"), *quantize_args, mode]))
            name = {
                "default": "quantize (default: fp-targets)",
                "no-heap-reuse": "quantize, glibc's default allocation (no heap policy)",
                "no-fp-targets": "quantize --no-fp-targets",
            }[run]
            shutil.rmtree(args.work / f"q-{run}", ignore_errors=True)
        rows.append((name, peak, wall, load, os.getloadavg()[0]))
        print(
            f"{name}: peak {peak / 2**20:.0f} MiB, {wall:.0f} s, load {rows[-1][3]:.2f} -> {rows[-1][4]:.2f}",
            flush=True,
        )
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M')}, commit {commit}, {os.cpu_count()} CPUs; {args.nsamples} x "
        f"{args.seq_len} calibration tokens, 4-bit g128 act-order"
    )
    print("| process | peak RSS | / fp16 model | wall | load average (1 min) before -> after |")
    print("|---|---|---|---|---|")
    for name, peak, wall, before, after in rows:
        print(f"| {name} | {peak / 2**20:.0f} MiB | {peak / size:.2f}x | {wall:.0f} s | {before:.2f} -> {after:.2f} |")


if __name__ == "__main__":
    main()

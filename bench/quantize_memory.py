"""Peak host memory of `gptq-bridge quantize` against the size of the float16 model (issue 3: "well under 2x").

Builds a random-weight float16 Llama directory of the size asked for (with the tests' word-level tokenizer),
then runs, each in a fresh process so each peak is its own:
- `baseline`: import gptq_bridge + transformers and load the float16 model, nothing else;
- `quantize`: the CLI, 4-bit g128 act-order: the default (fp-targets); the same without the quantizer's glibc
  heap reuse (`_reuse_freed_memory`); and --no-fp-targets.
Prints the peak resident memory of each (getrusage of the child), and the quantizer's peak over the
float16 model's size, with and without the part the baseline already needs (runtime + the model itself).

    python bench/quantize_memory.py --hidden 1536 --intermediate 4096 --layers 8
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


def build_model(out: Path, hidden: int, intermediate: int, layers: int) -> int:
    """A random float16 Llama in `out`; returns the bytes of its weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_checkpoints import tiny_tokenizer

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=96,
                         max_position_embeddings=2048, tie_word_embeddings=False)
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
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptq-bridge-memory"))
    ap.add_argument("--child", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.child is not None:  # one measured process: prints its own peak RSS last
        kind, *rest = args.child
        rc = 0
        if kind == "baseline":
            import gptq_bridge  # noqa: F401
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_pretrained(rest[0], dtype="auto")
        else:
            import contextlib

            import gptq_bridge.quantize as q
            from gptq_bridge.cli import main as cli_main

            if kind == "quantize-no-heap-reuse":  # glibc's default allocation behaviour, for comparison
                q._reuse_freed_memory = lambda *a, **k: contextlib.nullcontext()
            rc = cli_main(["quantize", *rest])
        print(f"PEAK_RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}")
        raise SystemExit(rc)

    shutil.rmtree(args.work, ignore_errors=True)
    src = args.work / "fp16"
    size = build_model(src, args.hidden, args.intermediate, args.layers)
    random.seed(0)
    words = "the a of to and in is it you that he was for on are with as I his they be at one have this from".split()
    text = args.work / "calibration.txt"
    text.write_text(" ".join(random.choice(words) for _ in range(args.nsamples * args.seq_len * 2)))
    print(f"float16 model: {size / 2**20:.0f} MiB ({args.layers} layers, hidden {args.hidden}, MLP {args.intermediate})",
          flush=True)
    rows = []
    base, wall = peak_of(child(["baseline", str(src)]))
    rows.append(("import + load the fp16 model", base, wall))
    for kind, mode in (("quantize", "--fp-targets"), ("quantize-no-heap-reuse", "--fp-targets"),
                       ("quantize", "--no-fp-targets")):
        out = args.work / f"q-{kind}{mode}"
        peak, wall = peak_of(child([kind, str(src), str(out), "--bits", "4", "--group-size", "128", "--desc-act",
                                    "--dataset", str(text), "--nsamples", str(args.nsamples),
                                    "--seq-len", str(args.seq_len), mode]))
        rows.append((f"{kind} {mode}", peak, wall))
    print(f"\n| process ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs) | peak RSS | / fp16 model | wall |")
    print("|---|---|---|---|")
    for name, peak, wall in rows:
        print(f"| {name} | {peak / 2**20:.0f} MiB | {peak / size:.2f}x | {wall:.0f} s |")
    for name, peak, _ in rows[1:]:
        print(f"{name}: {(peak - base) / size:.2f}x the fp16 model above what loading it needs "
              f"({(peak - base) / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()

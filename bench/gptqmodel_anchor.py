"""GPTQModel beside gptq-bridge: the same fp32 SmolLM2 directory, the same calibration windows, the same
perplexity, timed on the same machine (docs/QUALITY.md, "Time against GPTQModel").

GPTQModel lives in its own virtual environment (it pins numpy and other packages the project does not), so
this script has three steps, each run by the interpreter that has what it needs:

    # 1. project venv: the fp32 model directory and the calibration windows of bench/quality.py, saved as ids
    python bench/gptqmodel_anchor.py windows --work /tmp/gptq-quality
    # 2. GPTQModel's venv (pip install gptqmodel==7.6.0 torch==2.13.0): quantize, timed
    /tmp/venv-gptqmodel/bin/python bench/gptqmodel_anchor.py quantize --work /tmp/gptq-quality --setting 4g128
    # 3. project venv: perplexity of GPTQModel's checkpoint, loaded and evaluated exactly as ours is
    python bench/gptqmodel_anchor.py perplexity /tmp/gptq-quality/gptqmodel-4g128

`ours` (project venv) runs gptq-bridge's quantize the way bench/quality.py does, with the same timing
printout, so both can be alternated from one shell loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = {"4g128": (4, 128), "4g32": (4, 32), "3g128": (3, 128)}


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _timed(label: str, run) -> dict:
    load, t, cpu = _load(), time.perf_counter(), time.process_time()
    run()
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    row = {
        "run": label,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "load_before": load,
        "load_after": _load(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(row), flush=True)
    return row


def cmd_windows(args) -> None:
    """The project's fp32 directory and calibration windows (39 x 512 ids), as bench/quality.py makes them."""
    import torch

    sys.path.insert(0, str(HERE))
    import quality
    from transformers import AutoTokenizer

    from gptq_bridge.quantize import calibration_windows

    args.work.mkdir(parents=True, exist_ok=True)
    src = quality.fp32_dir(args.work)
    calib = args.work / "calibration.txt"
    calib.write_text(quality.calibration_text(), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    windows = calibration_windows(tokenizer, files=[calib], nsamples=quality.CALIB_WINDOWS, seq_len=quality.WINDOW)
    torch.save(windows, args.work / "calibration-windows.pt")
    print(f"{src}: fp32 model; {args.work / 'calibration-windows.pt'}: {list(windows.shape)} token ids")


def cmd_quantize(args) -> None:
    """GPTQModel 7.6.0 on the fp32 directory and the saved windows: act-order, sym, damp 0.1, v1 format."""
    import shutil

    # GPTQModel sizes its CPU worker pool as (cores + 1) // 2, and on 2 cores refuses to start ("Virtual pool
    # 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"); its own override sets it
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(args.threads))
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    torch.set_num_threads(args.threads)
    bits, group = SETTINGS[args.setting]
    src = args.work / "smollm2-135m-fp32"
    windows = torch.load(args.work / "calibration-windows.pt")
    calibration = [
        {"input_ids": w.unsqueeze(0), "attention_mask": torch.ones(1, w.numel(), dtype=torch.long)} for w in windows
    ]
    out = args.out or args.work / f"gptqmodel-{args.setting}"
    shutil.rmtree(out, ignore_errors=True)
    config = QuantizeConfig(
        bits=bits, group_size=group, desc_act=True, sym=True, damp_percent=0.1, true_sequential=True
    )

    os.chdir(args.work)  # GPTQModel writes a logs/ folder into the working directory

    def run():
        model = GPTQModel.load(str(src), config, device="cpu", dtype=getattr(torch, args.dtype))
        model.quantize(calibration, batch_size=1)
        model.save(str(out))

    row = _timed(f"GPTQModel 7.6.0 {args.setting} ({args.dtype}, load + quantize + save)", run)
    row["config"] = json.loads((out / "quantize_config.json").read_text())
    print(json.dumps(row["config"]))


def cmd_ours(args) -> None:
    """gptq-bridge's quantize exactly as bench/quality.py times it (load, calibrate, 30 blocks, write)."""
    import shutil

    import torch

    from gptq_bridge.quantize import quantize

    sys.path.insert(0, str(HERE))
    import quality

    torch.set_num_threads(args.threads)
    bits, group = SETTINGS[args.setting]
    out = args.out or args.work / f"gptq-bridge-{args.setting}"
    shutil.rmtree(out, ignore_errors=True)
    _timed(
        f"gptq-bridge {args.setting} (default, fp-targets)",
        lambda: quantize(
            args.work / "smollm2-135m-fp32",
            out,
            bits=bits,
            group_size=group,
            desc_act=True,
            sym=True,
            damp_percent=0.1,
            dataset=[args.work / "calibration.txt"],
            nsamples=quality.CALIB_WINDOWS,
            seq_len=quality.WINDOW,
            device="cpu",
            progress=False,
        ),
    )


def cmd_perplexity(args) -> None:
    """Held-out perplexity of a GPTQ checkpoint, loaded through gptq_bridge.load_model as bench/quality.py does."""
    import torch

    import gptq_bridge

    sys.path.insert(0, str(HERE))
    import quality

    torch.set_num_threads(args.threads)
    lm = gptq_bridge.load_model(str(args.checkpoint), device="cpu")
    ppl = quality.perplexity(lm.model, quality.held_out_windows(lm.tokenizer))
    print(json.dumps({"checkpoint": str(args.checkpoint), "perplexity": round(ppl, 2), "kernel": lm.kernel}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("windows", "quantize", "ours"):
        p = sub.add_parser(name)
        p.add_argument("--work", type=Path, default=Path("/tmp/gptq-bridge-quality"))
        if name != "windows":
            p.add_argument("--setting", choices=list(SETTINGS), default="4g128")
            p.add_argument("--out", type=Path, default=None)
            p.add_argument("--threads", type=int, default=2)
        if name == "quantize":
            p.add_argument("--dtype", default="float32", help="GPTQModel's load dtype (ours computes in float32)")
    p = sub.add_parser("perplexity")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    {"windows": cmd_windows, "quantize": cmd_quantize, "ours": cmd_ours, "perplexity": cmd_perplexity}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

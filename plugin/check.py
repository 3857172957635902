"""`gptq-bridge check`: load every tensor of a checkpoint and run one forward pass.

A quick way to learn whether a download is complete and consistent before wiring it into a frontend:
every error a load can raise (missing or truncated tensors, shapes that disagree with the settings) shows up
here as one line.
"""

from __future__ import annotations

import json
import time

import torch

from .hookspecs import hookimpl


def check(source: str, **load_kwargs) -> dict:
    from .api import load_model

    start = time.perf_counter()
    lm = load_model(source, **load_kwargs)
    load_s = time.perf_counter() - start
    vocab = lm.model.config.vocab_size
    ids = torch.arange(8, device=lm.device.torch_device).remainder(vocab).unsqueeze(0)
    with torch.inference_mode():
        logits = lm.model(ids).logits.float()
    finite = bool(torch.isfinite(logits).all())
    return {
        "source": source,
        "path": str(lm.source.path),
        "kernel": lm.kernel,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "load_seconds": round(load_s, 3),
        "weight_files": lm.weight_files,
        "logits_finite": finite,
        "ok": finite,
    }


def _cmd_check(args) -> int:
    result = check(
        args.source,
        device=args.device,
        kernel=args.kernel,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        status = "ok" if result["ok"] else "FAILED: the logits hold NaN or inf"
        print(
            f"{status}: {result['source']} loaded with kernel {result['kernel']} on {result['device']} "
            f"({result['dtype']}) in {result['load_seconds']:.2f} s; forward pass "
            f"{'finite' if result['logits_finite'] else 'NOT finite'}"
        )
    return 0 if result["ok"] else 1


@hookimpl
def gptq_register_commands(subparsers):
    from .explain import add_source_arguments

    p = subparsers.add_parser("check", help="load every tensor of a checkpoint and run one forward pass")
    p.add_argument("source", help="model directory or hub id org/name[:branch]")
    add_source_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_check)

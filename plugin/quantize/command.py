"""The `quantize` command."""

from __future__ import annotations

from ..config import ALLOWED_BITS
from ..hookspecs import hookimpl
from .pipeline import quantize
from .settings import PRESETS


def _cmd_quantize(args) -> int:
    result = quantize(
        args.source,
        args.out,
        preset=args.preset,
        bits=args.bits,
        group_size=args.group_size,
        desc_act=args.desc_act,
        sym=args.sym,
        static_groups=args.static_groups,
        damp_percent=args.damp,
        true_sequential=args.true_sequential,
        checkpoint_format=args.format,
        dataset=args.dataset,
        nsamples=args.nsamples,
        seq_len=args.seq_len,
        device=args.device,
        batch_size=args.batch_size,
        clip=args.clip,
        refit=args.refit,
        fp_targets=args.fp_targets,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
    )
    print(result.path)
    return 0


@hookimpl
def gptq_register_commands(subparsers):
    import argparse

    p = subparsers.add_parser(
        "quantize",
        help="make a GPTQ checkpoint (AutoGPTQ format) from an fp16/bf16/fp32 model or a GGUF file",
        description="Quantize a model with GPTQ. A --preset sets bits/group/act-order/damp as on the 70B card's "
        "branches; explicit options override it. Presets: " + ", ".join(PRESETS),
    )
    p.add_argument("source", help="model directory, hub id org/name[:branch], or a .gguf file")
    p.add_argument("out", help="output directory (must not exist; written atomically)")
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        metavar="NAME",
        help="settings of one of the card's branches: " + ", ".join(PRESETS),
    )
    p.add_argument("--bits", type=int, choices=list(ALLOWED_BITS), default=None, help="default 4")
    p.add_argument("--group-size", type=int, default=None, help="rows per group, or -1 for one group (default 128)")
    p.add_argument(
        "--desc-act",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="act-order: quantize rows by descending Hessian diagonal",
    )
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric zero points")
    p.add_argument(
        "--static-groups",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fix groups before act-order (g_idx monotonic)",
    )
    p.add_argument("--damp", type=float, default=None, help="damp_percent (default 0.01; presets 0.1)")
    p.add_argument(
        "--true-sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="quantize each layer on the outputs of the already-quantized ones (default on)",
    )
    p.add_argument("--format", choices=["gptq", "gptq_v2"], default=None, help="zero-point format (default gptq)")
    p.add_argument("--dataset", nargs="+", required=True, metavar="FILE", help="calibration text file(s)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda if present, else cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: up to 32k tokens)")
    p.add_argument("--no-clip", dest="clip", action="store_false", help="plain min/max ranges (no clipping search)")
    p.add_argument(
        "--no-refit",
        dest="refit",
        action="store_false",
        help="keep GPTQ's scales (no least-squares refit of the scales after rounding)",
    )
    p.add_argument(
        "--fp-targets",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fit each layer to the unquantized model's outputs (one more forward pass per block; "
        "default on, off with --no-true-sequential); --no-fp-targets: plain GPTQ",
    )
    p.add_argument("--revision", default=None, help="hub branch, tag or commit of the source")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the source model's own Python code")
    p.set_defaults(func=_cmd_quantize)

"""The `gptq-bridge` command. Errors are one line and a non-zero exit; `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import GPTQBridgeError


def _cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain, format_explanation

    e = explain(args.source, device=args.device, kernel=args.kernel, revision=args.revision,
                trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    if args.json:
        out = {"source": e.source, "config_file": e.config_file, "chosen": e.chosen,
               "kernels": [v.model_dump() for v in e.kernels],
               "settings": e.settings.to_json_dict(), "device": e.device, "dtype": e.dtype, "layers": e.layers}
        print(json.dumps(out, indent=2))
    else:
        print(format_explanation(e))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptq-bridge", description="Run GPTQ-quantized LLMs anywhere.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("explain", help="which kernel serves a checkpoint on this machine, and why")
    p.add_argument("source", help="model directory or hub id org/name[:branch]")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    p.add_argument("--kernel", default="auto", help="force a kernel by name (default: auto)")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt weight files (they can run code)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except GPTQBridgeError as exc:
        if args.debug:
            raise
        print(f"gptq-bridge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gptq-bridge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

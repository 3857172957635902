"""The `gptq-bridge` command. Subcommands come from plugins (`gptq_register_commands`), built-ins included.

Errors are one line and a non-zero exit; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import GPTQBridgeError


def build_parser() -> argparse.ArgumentParser:
    from .plugins import get_plugin_manager

    parser = argparse.ArgumentParser(prog="gptq-bridge", description="Run GPTQ-quantized LLMs anywhere.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    get_plugin_manager().hook.gptq_register_commands(subparsers=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except GPTQBridgeError as exc:
        if debug:
            raise
        print(f"gptq-bridge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gptq-bridge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

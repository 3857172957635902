"""The `generate`, `chat` and `info` commands.

Answers go to stdout as they are generated; progress and notes go to stderr, so `generate ... > out.txt`
holds the answer only. Ctrl-C in `chat` stops the answer being written, not the program.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time

from .errors import GPTQBridgeError
from .explain import add_source_arguments, add_split_arguments, describe_settings, split_options
from .hookspecs import hookimpl


def progress(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"gptq-bridge: {message}", file=sys.stderr, flush=True)


def model_source(args) -> str:
    from .default_model import default_source

    return args.model or default_source()


def open_model(args):
    from .api import load_model

    source = model_source(args)
    progress(args, f"loading {source} ...")
    start = time.perf_counter()
    lm = load_model(
        source,
        kernel=args.kernel,
        device=args.device,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        progress=lambda line: progress(args, line),
        engine=args.engine,
        **split_options(args),
    )
    from .prompts import choose_prompt_format

    explicit = getattr(args, "prompt_format", None)
    choice = choose_prompt_format(lm.tokenizer, lm.source, explicit)  # an unknown name fails now
    lm.prompt_format = explicit
    fmt = "" if getattr(args, "raw", False) else f"; prompt format {choice.name}: {choice.reason}"
    where = ", ".join(f"{k} on {d}" for d, k in lm.kernels.items()) if lm.placement else f"{lm.kernel} on {lm.device}"
    progress(args, f"loaded in {time.perf_counter() - start:.1f} s (kernel {where}{fmt})")
    if lm.placement:
        for line in lm.placement.describe():
            progress(args, f"  {line}")
    return lm


def add_engine_arguments(p) -> None:
    g = p.add_argument_group("decode engine")
    g.add_argument(
        "--engine",
        choices=("auto", "off"),
        default="auto",
        help="auto: Llama-family models run in the decode engine; off: transformers' forward",
    )
    g.add_argument(
        "--kv-cache",
        default=None,
        metavar="BUDGET",
        help="the engine's KV cache: tokens (8192) or a size (4GiB); default: half the free GPU "
        "memory, or four contexts on the CPU (a split reserves one context, at most 8192 tokens)",
    )
    add_split_arguments(p)


def add_sampling_arguments(p) -> None:
    g = p.add_argument_group("generation")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="at most this many new tokens (default 256, or half the context if that is shorter)",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability mass")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--typical-p", type=float, default=1.0, help="locally typical sampling mass (1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--repetition-penalty-range", type=int, default=0, help="last N tokens penalised (0 = all)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted once per token seen")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="subtracted per occurrence")
    g.add_argument("--seed", type=int, default=None, help="same seed and settings give the same output")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    g.add_argument("--ban-token", action="append", type=int, default=[], metavar="ID", help="never emit this token id")
    g.add_argument("--ban-eos", action="store_true", help="never end at the end-of-sequence token")
    g.add_argument("--add-bos", dest="add_bos", action="store_true", default=None, help="always start with BOS")
    g.add_argument("--no-add-bos", dest="add_bos", action="store_false", help="never add a BOS token")
    g.add_argument("--keep-special-tokens", action="store_true", help="show special tokens in the text")
    g.add_argument(
        "--prompt-format",
        default=None,
        metavar="NAME",
        help="how chat messages become text (see `gptq-bridge info`); default: chosen from the model",
    )
    g.add_argument("--system", default=None, help="a system message")
    g.add_argument(
        "--truncate",
        choices=("left", "error"),
        default="left",
        help="a prompt longer than the context: cut its start (default) or refuse",
    )
    g.add_argument("--context-length", type=int, default=None, help="use at most this many tokens of context")


def sampling_params(args) -> dict:
    """The generation keywords the command line gave (max_new_tokens only when given: its default adapts)."""
    given = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}
    return dict(
        **given,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        typical_p=args.typical_p,
        repetition_penalty=args.repetition_penalty,
        repetition_penalty_range=args.repetition_penalty_range,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=args.stop,
        banned_token_ids=args.ban_token,
        ban_eos=args.ban_eos,
        add_bos=args.add_bos,
        skip_special_tokens=not args.keep_special_tokens,
        truncate=args.truncate,
        context_length=args.context_length,
    )


@contextlib.contextmanager
def ctrl_c_cancels(cancel: threading.Event):
    """While an answer is prepared and written, Ctrl-C sets `cancel` (the generator stops before its next token)
    instead of raising KeyboardInterrupt somewhere in the middle of the model."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: cancel.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def write_stream(stream, out) -> None:
    for chunk in stream:
        out.write(chunk.text)
        out.flush()


# --- generate ------------------------------------------------------------------------------------------------


def _cmd_generate(args) -> int:
    from .stream import make_params

    if args.prompt is not None:
        text = args.prompt
    elif sys.stdin.isatty():
        raise GPTQBridgeError("no prompt: give PROMPT, or pipe the prompt on stdin")
    else:
        text = sys.stdin.read().removesuffix("\n")
    params = sampling_params(args)
    request_keys = ("truncate", "context_length")
    make_params(**{k: v for k, v in params.items() if k not in request_keys})  # bad values fail before loading
    if args.raw and (args.system or args.input or args.prompt_format):
        raise GPTQBridgeError(
            "--raw sends the prompt as it is; it cannot be combined with --system, --input or --prompt-format"
        )
    lm = open_model(args)
    if args.raw:
        prompt = text
        extra = {}
    else:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": text}
        ]
        extra = {"input": args.input} if args.input else {}
    start = time.perf_counter()
    cancel = threading.Event()
    with ctrl_c_cancels(cancel), lm.stream(prompt, cancel=cancel, **params, **extra) as stream:
        if args.json:
            result = stream.consume()
        else:
            write_stream(stream, sys.stdout)
            result = stream.result
            sys.stdout.write("\n")
            sys.stdout.flush()
    elapsed = time.perf_counter() - start
    if args.json:
        out = result.model_dump(exclude={"extra"})
        out["model"] = lm.source.text
        out["seconds"] = round(elapsed, 3)
        print(json.dumps(out, ensure_ascii=False))
    if result.truncated_prompt_tokens:
        progress(
            args,
            f"the prompt was longer than the context: its first {result.truncated_prompt_tokens} tokens were dropped",
        )
    progress(args, f"{result.usage.completion_tokens} tokens in {elapsed:.1f} s, finish: {result.finish_reason}")
    return 130 if result.finish_reason == "cancelled" else 0


# --- chat ---------------------------------------------------------------------------------------------------


CHAT_HELP = "/reset forgets the conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops an answer."


def _read_line(interactive: bool) -> str | None:
    """The next line the user typed; None at the end of input."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def fit_history(lm, history: list[dict], params: dict) -> tuple[list[dict], int]:
    """Drop the oldest exchanges (never the system message or the newest question) until the conversation fits
    the context whole: cutting tokens off the front would cut into the prompt format's markup."""
    from .generation import prepare
    from .stream import make_request

    dropped = 0
    while True:
        prep = prepare(lm, make_request(history, **params))
        turns = [i for i, m in enumerate(history) if m["role"] != "system"]
        if not prep.truncated or len(turns) <= 1:
            return history, dropped
        first = turns[0]
        cut = 2 if len(turns) > 2 and history[first + 1]["role"] == "assistant" else 1
        history = history[:first] + history[first + cut :]
        dropped += cut


def _cmd_chat(args) -> int:
    from .stream import make_params

    params = sampling_params(args)
    make_params(**{k: v for k, v in params.items() if k not in ("truncate", "context_length")})
    lm = open_model(args)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(CHAT_HELP, file=sys.stderr)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    while True:
        try:
            line = _read_line(interactive)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, not the end
            print()
            continue
        if line is None:
            return 0
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history = list(start)
            print("(conversation reset)", file=sys.stderr, flush=True)
            continue
        if command in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr, flush=True)
            continue
        if command.startswith("/"):
            print(f"unknown command {command.split()[0]!r}; {CHAT_HELP}", file=sys.stderr, flush=True)
            continue
        cancel = threading.Event()
        try:
            with ctrl_c_cancels(cancel):
                asked, dropped = fit_history(lm, history + [{"role": "user", "content": line}], params)
                if dropped:
                    print(
                        f"(the conversation outgrew the context: its {dropped} oldest messages are left out)",
                        file=sys.stderr,
                        flush=True,
                    )
                with lm.stream(asked, cancel=cancel, **params) as stream:
                    write_stream(stream, sys.stdout)
        except KeyboardInterrupt:  # Ctrl-C in the instant before the handler was in place: drop the question
            print("\n(answer stopped)", file=sys.stderr, flush=True)
            continue
        history = asked
        result = stream.result
        sys.stdout.write("\n")
        sys.stdout.flush()
        if result.finish_reason == "cancelled":
            print("(answer stopped)", file=sys.stderr, flush=True)
        if result.truncated_prompt_tokens:
            print(
                f"(the conversation outgrew the context: its first {result.truncated_prompt_tokens} tokens "
                "were left out; /reset starts afresh)",
                file=sys.stderr,
                flush=True,
            )
        history.append({"role": "assistant", "content": result.text})


# --- info -----------------------------------------------------------------------------------------------------


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def model_info(
    source: str,
    *,
    device=None,
    kernel: str = "auto",
    revision=None,
    trust_remote_code=False,
    allow_pickle=False,
    prompt_format: str | None = None,
    **split,
) -> dict:
    """What `info` shows, without reading any weights: settings, kernel, prompt format, size, memory; with a
    split (`load_model`'s gpu_split, max_memory, device_map, kv_cache), where each part goes."""
    import torch

    from .api import load_options
    from .loader import load_tokenizer, plan_load, prepared_bytes
    from .plugins import registered_kernels, resolve
    from .prompts import choose_prompt_format

    resolved = resolve(source, revision=revision, allow_pickle=allow_pickle)
    options = load_options(
        kernel=kernel, device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, **split
    )
    dev, dtype = options.device, options.dtype
    plan = plan_load(resolved, options)
    tokenizer = load_tokenizer(resolved.path, trust_remote_code)
    choice = choose_prompt_format(tokenizer, resolved, prompt_format)

    quantized = {layer.name for layer in plan.layers}
    params = 0
    other_bytes = 0
    seen = set()
    for name, p in plan.model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel()
        if name.rpartition(".")[0] not in quantized:
            other_bytes += p.numel() * dtype.itemsize
    spec = next(k for k in registered_kernels() if k.name == plan.choice.chosen)
    quant_bytes = 0
    with torch.device("meta"):
        for layer in plan.layers:
            quant_bytes += prepared_bytes(spec.factory(layer, plan.config, dtype))
    cfg = plan.hf_config
    ctx = getattr(cfg, "max_position_embeddings", None)
    layers = getattr(cfg, "num_hidden_layers", 0)
    heads = getattr(cfg, "num_attention_heads", 0) or 1
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 0) // heads
    kv_per_token = 2 * layers * kv_heads * head_dim * dtype.itemsize
    return {
        "source": source,
        "path": str(resolved.path),
        "architecture": (getattr(cfg, "architectures", None) or [type(plan.model).__name__])[0],
        "layers": layers,
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "context_length": ctx,
        "quantization": describe_settings(plan.config),
        "config_file": plan.config_file.label,
        "quantized_linears": len(plan.layers),
        "device": str(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "kernel": plan.choice.chosen,
        "generation": generation_path(plan.model),
        "prompt_format": choice.name,
        "prompt_format_reason": choice.reason,
        "tokenizer": type(tokenizer).__name__ if tokenizer is not None else None,
        "parameters": params,
        "weights_bytes": quant_bytes + other_bytes,
        "kv_cache_bytes_per_token": kv_per_token,
        "kv_cache_bytes_full_context": kv_per_token * (ctx or 0),
        "placement": plan.placement.to_json() if plan.placement else None,
        "placement_lines": plan.placement.describe() if plan.placement else None,
        "kernel_per_device": {d: c.chosen for d, c in plan.choices.items()} if plan.choices else None,
        "kv_cache_tokens_reserved": plan.kv_tokens,
    }


def generation_path(hf_model) -> str:
    """Which generator a model takes: the decode engine, or transformers' forward and why."""
    from .engine.forward import unsupported_reason

    reason = unsupported_reason(hf_model)
    if reason is None:
        return "decode engine (requests batched, paged KV cache; CUDA graphs on a GPU)"
    return f"transformers' forward, one request at a time ({reason})"


def format_info(i: dict) -> str:
    params = i["parameters"]
    count = f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M" if params >= 1e6 else f"{params:,}"
    total = i["weights_bytes"] + i["kv_cache_bytes_full_context"]
    lines = [
        f"source:        {i['source']}" + (f"  ({i['path']})" if i["path"] != i["source"] else ""),
        f"architecture:  {i['architecture']}, {i['layers']} layers, hidden {i['hidden_size']}, "
        f"vocabulary {i['vocab_size']}, context {i['context_length']}",
        f"quantization:  {i['quantization']}  (from {i['config_file']}; {i['quantized_linears']} quantized Linears)",
        f"kernel:        {i['kernel']} on {i['device']}, {i['dtype']}  (`gptq-bridge explain` says why)",
        f"generation:    {i['generation']}",
        f"prompt format: {i['prompt_format']}  ({i['prompt_format_reason']})",
        f"tokenizer:     {i['tokenizer'] or 'none (this checkpoint cannot generate text)'}",
        f"parameters:    {count}",
        f"memory:        weights {_human(i['weights_bytes'])} + KV cache {_human(i['kv_cache_bytes_per_token'])}"
        f"/token ({_human(i['kv_cache_bytes_full_context'])} at full context) = about {_human(total)}",
    ]
    if i.get("placement_lines"):
        kernels = ", ".join(f"{k} on {d}" for d, k in i["kernel_per_device"].items())
        lines.append(
            f"split:         {len(i['placement'])} device{'s' if len(i['placement']) > 1 else ''}, KV cache of {i['kv_cache_tokens_reserved']} tokens "
            f"beside each layer (kernels: {kernels})"
        )
        lines += [f"               {line}" for line in i["placement_lines"]]
    return "\n".join(lines)


def _cmd_info(args) -> int:
    info = model_info(
        args.source,
        device=args.device,
        kernel=args.kernel,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        prompt_format=args.prompt_format,
        **split_options(args),
    )
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


@hookimpl
def gptq_register_commands(subparsers):
    p = subparsers.add_parser("generate", help="generate text from a prompt (streamed to stdout)")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read from stdin)")
    p.add_argument("--model", "-m", default=None, metavar="SOURCE", help="model directory or hub id org/name[:branch]")
    add_source_arguments(p)
    add_engine_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--raw", action="store_true", help="send the prompt as it is, without the prompt format")
    p.add_argument("--input", default=None, help="extra input for formats with an input block (alpaca)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the text, finish reason and usage")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_cmd_generate)

    p = subparsers.add_parser("chat", help="chat with a model in the terminal (or over piped lines)")
    p.add_argument("--model", "-m", default=None, metavar="SOURCE", help="model directory or hub id org/name[:branch]")
    add_source_arguments(p)
    add_engine_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_cmd_chat)

    p = subparsers.add_parser("info", help="what a checkpoint is and how it would run here (reads no weights)")
    p.add_argument("source", help="model directory or hub id org/name[:branch]")
    add_source_arguments(p)
    p.add_argument("--prompt-format", default=None, metavar="NAME", help="check this prompt format instead")
    add_split_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_info)

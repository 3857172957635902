"""text-generation-webui extension: gptq-bridge owns generation inside the webui (and its OpenAI API).

Install with `gptq-bridge textgen install TGW_DIR`, then start the webui with `--extensions gptq_bridge`
(and `--api` for its OpenAI-compatible server). The installed `script.py` only re-exports this module, so
upgrading gptq-bridge upgrades the extension.

What the webui needs from an extension that owns generation:
- `setup()` loads the model once and sets `shared.model`, `shared.model_name` and a real Hugging Face
  tokenizer in `shared.tokenizer`: the webui refuses to encode a prompt (API included) without one.
- `custom_generate_reply(...)` yields the cumulative reply. The webui has called it with two signatures:
  `(question, original_question, seed, state, stopping_strings, is_chat=False)` (2023-2024) and
  `(question, original_question, state, stopping_strings, is_chat=False)` (2025 on); both work here.
- `custom_tokenized_length(prompt)` lets chat-history truncation count with the real tokenizer.
"""

from __future__ import annotations

import ast
import threading
from typing import Any

from ..errors import GPTQBridgeError
from ..hookspecs import hookimpl
from .common import model_display_name, shared_model

EXTENSION_NAME = "gptq_bridge"

# The webui overwrites these from its settings (key "gptq_bridge-<name>") before calling setup().
params: dict[str, Any] = {
    "display_name": "gptq-bridge",
    "is_tab": False,
    "model": "",  # GPTQ source: directory or org/name[:branch]; empty = the embedded default model
    "kernel": "auto",  # a kernel name (gptq-bridge explain lists them) or auto
    "device": "",  # cpu, cuda, cuda:N; empty = cuda if present
    "gpu_split": "",  # split across GPUs: GiB each, in order ("20,24"), or "auto"; empty = one device
    "max_memory": "",  # or a budget per device: "0=20GiB,1=24GiB,cpu=48GiB" (layers on the CPU run there)
    "prompt_format": "",  # the webui formats prompts itself; a format named here adds the stop strings it implies
}

# webui state keys -> gptq-bridge generation parameters, for values that pass through unchanged
DIRECT = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repetition_penalty": "repetition_penalty",
    "repetition_penalty_range": "repetition_penalty_range",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "ban_eos_token": "ban_eos",
    "add_bos_token": "add_bos",
    "skip_special_tokens": "skip_special_tokens",
}


def split_settings() -> dict:
    """The split settings as `load_model` keywords (empty settings: none)."""
    gpu_split = str(params.get("gpu_split") or "").strip()
    max_memory = str(params.get("max_memory") or "").strip()
    if gpu_split.lower() == "auto":
        return {"device_map": "auto"}
    return {**({"gpu_split": gpu_split} if gpu_split else {}), **({"max_memory": max_memory} if max_memory else {})}


def _loaded():
    return shared_model(
        params["model"] or None,
        kernel=params["kernel"] or "auto",
        device=params["device"] or None,
        **split_settings(),
    )


def setup() -> None:
    """Load the model once and tell the webui it has a model and a tokenizer."""
    from modules import shared  # the webui's own module; present when the webui loads us

    loaded = _loaded()
    if loaded.tokenizer is None:
        raise GPTQBridgeError(f"{loaded.source.path}: ships no tokenizer; the webui needs one to serve prompts")
    shared.model = loaded.model
    shared.tokenizer = loaded.tokenizer
    shared.model_name = model_display_name(loaded)


def parse_stop_strings(value: Any) -> list[str]:
    """The UI writes stop strings as `"\\n", "###"`; the API sends a list. Both become a list."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(f"[{value}]")
        except (SyntaxError, ValueError):
            raise GPTQBridgeError(
                f'custom_stopping_strings {value!r}: write them as quoted strings, e.g. "\\n", "###"'
            ) from None
        value = parsed
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise GPTQBridgeError(f"stop strings must be strings, got {value!r}")
    return [s for s in value if s]


def parse_token_bans(value: Any) -> list[int]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            return [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise GPTQBridgeError(f"custom_token_bans {value!r}: expected comma-separated token ids") from None
    return [int(v) for v in value]


def state_to_kwargs(state: dict[str, Any], stopping_strings: Any, prompt_tokens: int) -> dict[str, Any]:
    """Map the webui's generation state to gptq-bridge's generation keywords."""
    kw: dict[str, Any] = {ours: state[theirs] for theirs, ours in DIRECT.items() if theirs in state}
    if state.get("do_sample") is False:
        kw["temperature"] = 0.0
    if kw.get("repetition_penalty_range", 0) < 0:
        kw["repetition_penalty_range"] = 0
    seed = state.get("seed", -1)
    kw["seed"] = None if seed is None or int(seed) == -1 else int(seed)
    kw["stop"] = list(
        dict.fromkeys(parse_stop_strings(stopping_strings) + parse_stop_strings(state.get("custom_stopping_strings")))
    )
    if params["prompt_format"]:  # the webui formats the prompt itself; the format still implies stop strings
        from ..prompts import registered_prompt_formats

        formats = registered_prompt_formats()
        if params["prompt_format"] not in formats:
            raise GPTQBridgeError(
                f"gptq_bridge-prompt_format {params['prompt_format']!r} is not registered "
                f"(registered: {', '.join(formats)})"
            )
        kw["stop"] = list(dict.fromkeys(kw["stop"] + list(formats[params["prompt_format"]].stop)))
    kw["banned_token_ids"] = parse_token_bans(state.get("custom_token_bans"))
    max_new = int(state.get("max_new_tokens", 512))
    context = state.get("truncation_length")
    if context:
        kw["context_length"] = int(context)
        if state.get("auto_max_new_tokens"):
            max_new = max(int(context) - prompt_tokens, 1)
    kw["max_new_tokens"] = max_new
    return kw


def _split_signature(args: tuple, kwargs: dict) -> tuple[dict, Any, bool]:
    """(state, stopping_strings, is_chat) from either of the webui's call signatures."""
    args = list(args)
    if args and not isinstance(args[0], dict):  # 2023-2024: seed comes before state
        args.pop(0)
    kwargs.pop("seed", None)
    state = args.pop(0) if args else kwargs.pop("state")
    stopping_strings = args.pop(0) if args else kwargs.pop("stopping_strings", None)
    is_chat = args.pop(0) if args else kwargs.pop("is_chat", False)
    return state, stopping_strings, is_chat


def custom_generate_reply(question: str, original_question: str, *args: Any, **kwargs: Any):
    """Yield the cumulative reply; stop when the webui's stop button is pressed or it stops iterating."""
    state, stopping_strings, _is_chat = _split_signature(args, kwargs)
    loaded = _loaded()
    prompt_tokens = custom_tokenized_length(question)
    gen_kwargs = state_to_kwargs(state, stopping_strings, prompt_tokens)
    if gen_kwargs.get("add_bos") and getattr(loaded.tokenizer, "bos_token_id", None) is None:
        gen_kwargs["add_bos"] = None  # the webui's default is "add BOS"; a tokenizer without one adds nothing
    cancel = threading.Event()
    stop_event = state.get("stop_event")
    webui_shared = _webui_shared()
    stream_mode = state.get("stream", True)
    reply = ""
    with loaded.stream(question, cancel=cancel, **gen_kwargs) as stream:
        for chunk in stream:
            reply = chunk.full_text
            if stream_mode:
                yield reply
            if (webui_shared is not None and webui_shared.stop_everything) or (
                stop_event is not None and stop_event.is_set()
            ):
                cancel.set()
        reply = stream.result.text
    yield reply


def custom_tokenized_length(prompt: str) -> int:
    return len(_loaded().tokenizer.encode(prompt, add_special_tokens=False))


def _webui_shared():
    try:
        from modules import shared
    except ImportError:  # driven outside the webui (tests, scripts)
        return None
    return shared


def ui() -> None:
    """Settings in the webui's extensions block; 'Load' reloads with the new values."""
    import gradio as gr

    from ..plugins import registered_kernels
    from ..prompts import registered_prompt_formats

    with gr.Accordion("gptq-bridge", open=True):
        model = gr.Textbox(value=params["model"], label="Model (directory or org/name:branch; empty = default model)")
        kernel = gr.Dropdown(
            choices=["auto"] + [k.name for k in registered_kernels()], value=params["kernel"], label="Kernel"
        )
        device = gr.Textbox(value=params["device"], label="Device (cpu, cuda, cuda:N; empty = auto)")
        gpu_split = gr.Textbox(
            value=params["gpu_split"], label="GPU split (GiB per GPU in order, e.g. 20,24; auto; empty = one device)"
        )
        max_memory = gr.Textbox(
            value=params["max_memory"], label="Max memory per device (e.g. 0=20GiB,cpu=48GiB; empty = none)"
        )
        fmt = gr.Dropdown(
            choices=[""] + sorted(registered_prompt_formats()),
            value=params["prompt_format"],
            label="Prompt format (its stop strings are added; the webui formats prompts itself)",
        )
        status = gr.Markdown()
        load = gr.Button("Load")

    def apply(model_v, kernel_v, device_v, split_v, memory_v, fmt_v):
        params.update(
            model=model_v, kernel=kernel_v, device=device_v, gpu_split=split_v, max_memory=memory_v, prompt_format=fmt_v
        )
        setup()
        lm = _loaded()
        where = "; ".join(lm.placement.describe()) if lm.placement else ""
        return f"Loaded **{_webui_shared().model_name}** with kernel `{lm.kernel}`." + (
            f" Split: {where}" if where else ""
        )

    load.click(apply, [model, kernel, device, gpu_split, max_memory, fmt], status)


SCRIPT = '''"""text-generation-webui extension: gptq-bridge. Installed by `gptq-bridge textgen install`."""
from gptq_bridge.adapters.textgen import (  # noqa: F401
    custom_generate_reply, custom_tokenized_length, params, setup, ui,
)
'''


def install(webui_dir: str) -> str:
    """Write the extension into a text-generation-webui checkout; returns the folder written."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    root = Path(webui_dir)
    if not (root / "server.py").is_file() or not (root / "modules").is_dir():
        raise GPTQBridgeError(f"{root}: not a text-generation-webui checkout (no server.py and modules/)")
    base = root / "user_data" / "extensions" if (root / "user_data").is_dir() else root / "extensions"
    base.mkdir(parents=True, exist_ok=True)
    target = base / EXTENSION_NAME
    tmp = Path(tempfile.mkdtemp(prefix=f".{EXTENSION_NAME}-", dir=base))
    try:
        (tmp / "script.py").write_text(SCRIPT)
        (tmp / "README.md").write_text(
            "# gptq-bridge\n\nStart the webui with `--extensions gptq_bridge` (add `--api` for the OpenAI API).\n"
            "Settings: see gptq-bridge's docs/adapters/textgen.md.\n"
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)


def _cmd_textgen(args) -> int:
    print(f"installed the gptq_bridge extension in {install(args.webui_dir)}")
    print("start the webui with: python server.py --extensions gptq_bridge [--api]")
    return 0


@hookimpl
def gptq_register_commands(subparsers):
    p = subparsers.add_parser("textgen", help="text-generation-webui integration")
    sub = p.add_subparsers(dest="textgen_command", required=True)
    inst = sub.add_parser("install", help="install the gptq_bridge extension into a webui checkout")
    inst.add_argument("webui_dir", help="the text-generation-webui folder (the one holding server.py)")
    inst.set_defaults(func=_cmd_textgen)

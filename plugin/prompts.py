"""Prompt formats: chat messages to the text a model was trained on, and which format a model gets.

Formats are registered through `gptq_register_prompt_formats`, built-ins included. Which one applies:
an explicit choice > the tokenizer's own chat template > a format whose `model_patterns` match the model's
name (repo id, directory, `_name_or_path`) > a "Prompt template:" line in the model's README > plain text.

Before rendering, system messages are gathered at the front and consecutive messages of the same role are
merged (joined by a blank line): every format here, and most chat templates, expect alternating turns.
When the last message is the assistant's, the text ends with its content, so the model continues that reply.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import GPTQBridgeError
from .hookspecs import hookimpl
from .types import ChatMessage, PromptFormat, ResolvedSource

TOKENIZER_FORMAT = "tokenizer"
PLAIN_FORMAT = "plain"


def merge_messages(messages: list[ChatMessage | dict]) -> list[ChatMessage]:
    """System messages first (as one), then the others with consecutive same-role messages merged."""
    msgs = [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in messages]
    system = [m.content for m in msgs if m.role == "system"]
    merged: list[ChatMessage] = [ChatMessage(role="system", content="\n\n".join(system))] if system else []
    for m in msgs:
        if m.role == "system":
            continue
        if merged and merged[-1].role == m.role:
            merged[-1] = ChatMessage(role=m.role, content=merged[-1].content + "\n\n" + m.content)
        else:
            merged.append(m)
    return merged


def _split(messages: list[ChatMessage]) -> tuple[str | None, list[ChatMessage]]:
    if messages and messages[0].role == "system":
        return messages[0].content, messages[1:]
    return None, messages


# --- the built-in formats ------------------------------------------------------------------------


def _alpaca(messages: list[ChatMessage], *, input: str | None = None, with_input: bool = True, **_: Any) -> str:
    """Nous-Hermes-Llama2's format (its card): `### Instruction:` / [`### Input:`] / `### Response:` blocks."""
    system, turns = _split(messages)
    out = [f"{system}\n\n"] if system else []
    last_user = max((i for i, m in enumerate(turns) if m.role == "user"), default=-1)
    for i, m in enumerate(turns):
        if m.role == "user":
            out.append(f"### Instruction:\n{m.content}\n\n")
            if with_input and input and i == last_user:
                out.append(f"### Input:\n{input}\n\n")
            out.append("### Response:\n")
        else:
            out.append(m.content if i == len(turns) - 1 else f"{m.content}\n\n")
    return "".join(out)


def _alpaca_instruct_only(messages: list[ChatMessage], **kw: Any) -> str:
    return _alpaca(messages, **{**kw, "with_input": False})


def _special(tokenizer, attr: str, default: str) -> str:
    value = getattr(tokenizer, attr, None) if tokenizer is not None else None
    return value if isinstance(value, str) and value else default


def _llama2_chat(messages: list[ChatMessage], *, tokenizer=None, **_: Any) -> str:
    """Meta's Llama-2-chat: `<s>[INST] <<SYS>>...<</SYS>>` user `[/INST]` answer `</s>`, per exchange."""
    bos, eos = _special(tokenizer, "bos_token", "<s>"), _special(tokenizer, "eos_token", "</s>")
    system, turns = _split(messages)
    out = []
    for i, m in enumerate(turns):
        if m.role == "user":
            content = m.content.strip()
            if system is not None and not out:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            out.append(f"{bos}[INST] {content} [/INST]")
        else:
            if not out:  # an answer with no question before it
                out.append(f"{bos}[INST]  [/INST]")
            out.append(f" {m.content.strip()}" + ("" if i == len(turns) - 1 else f" {eos}"))
    if not out and system is not None:
        out.append(f"{bos}[INST] <<SYS>>\n{system}\n<</SYS>>\n\n [/INST]")
    return "".join(out)


def _chatml(messages: list[ChatMessage], **_: Any) -> str:
    out = []
    for i, m in enumerate(messages):
        if m.role == "assistant" and i == len(messages) - 1:
            out.append(f"<|im_start|>assistant\n{m.content}")
            return "".join(out)
        out.append(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n")
    return "".join(out) + "<|im_start|>assistant\n"


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def _vicuna(messages: list[ChatMessage], *, tokenizer=None, **_: Any) -> str:
    """Vicuna v1.1: `{system} USER: ... ASSISTANT: ...</s>USER: ... ASSISTANT:`."""
    eos = _special(tokenizer, "eos_token", "</s>")
    system, turns = _split(messages)
    out = [system if system is not None else VICUNA_SYSTEM, " "]
    for i, m in enumerate(turns):
        if m.role == "user":
            out.append(f"USER: {m.content} ")
        else:
            out.append(f"ASSISTANT: {m.content}" + ("" if i == len(turns) - 1 else eos))
    if not turns or turns[-1].role == "user":
        out.append("ASSISTANT:")
    return "".join(out)


def _plain(messages: list[ChatMessage], **_: Any) -> str:
    """A lone user message is sent as it is; a conversation becomes a `User:` / `Assistant:` transcript."""
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].content
    label = {"system": "System", "user": "User", "assistant": "Assistant"}
    lines = [f"{label[m.role]}: {m.content}" for m in messages]
    if messages[-1].role != "assistant":
        lines.append("Assistant:")
    return "\n".join(lines)


def _tokenizer_template(messages: list[ChatMessage], *, tokenizer=None, **_: Any) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise GPTQBridgeError(f"prompt_format {TOKENIZER_FORMAT!r}: this model's tokenizer has no chat template")
    continuing = messages[-1].role == "assistant"
    try:
        return tokenizer.apply_chat_template(
            [m.model_dump() for m in messages],
            tokenize=False,
            add_generation_prompt=not continuing,
            continue_final_message=continuing,
        )
    except Exception as exc:  # jinja raises its own errors, templates raise what they like
        raise GPTQBridgeError(
            f"prompt_format {TOKENIZER_FORMAT!r}: the tokenizer's chat template failed: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


def template_end_of_turn(tokenizer) -> tuple[str, ...]:
    """The special token a chat template puts after an assistant's reply (`<|im_end|>`, `<|eot_id|>`, ...).

    Chat models often end a reply with it rather than with the tokenizer's EOS, so it is an implied stop.
    Found by rendering a reply and looking at what follows it.
    """
    sentinel = "Sentinel reply 7f3a."
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": sentinel}], tokenize=False
        )
        specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    except Exception:  # a template that refuses this conversation implies nothing
        return ()
    i = text.find(sentinel) if isinstance(text, str) else -1
    if i < 0:
        return ()
    after = text[i + len(sentinel) :].lstrip(" ")
    for special in sorted((s for s in specials if s), key=len, reverse=True):
        if after.startswith(special):
            return (special,)
    return ()


BUILTIN_FORMATS = (
    PromptFormat(
        name="alpaca",
        description="### Instruction: / ### Input: / ### Response: (Nous-Hermes-Llama2)",
        render=_alpaca,
        stop=("### Instruction:", "### Input:"),
        model_patterns=(r"nous-hermes-(llama-?2|l2|13b|7b)", r"alpaca"),
    ),
    PromptFormat(
        name="alpaca-instruct-only",
        description="### Instruction: / ### Response: (no input block)",
        render=_alpaca_instruct_only,
        stop=("### Instruction:",),
    ),
    PromptFormat(
        name="llama-2-chat",
        description="[INST] <<SYS>> ... [/INST] (Meta's Llama-2-chat)",
        render=_llama2_chat,
        stop=("[INST]",),
        model_patterns=(r"llama-?2.*chat",),
    ),
    PromptFormat(
        name="chatml",
        description="<|im_start|>role ... <|im_end|> (OpenHermes, Hermes 2, Dolphin)",
        render=_chatml,
        stop=("<|im_end|>", "<|im_start|>"),
        model_patterns=(r"hermes-2|hermes-3|openhermes|chatml|dolphin",),
    ),
    PromptFormat(
        name="vicuna",
        description="USER: ... ASSISTANT: (Vicuna v1.1)",
        render=_vicuna,
        stop=("USER:",),
        model_patterns=(r"vicuna",),
    ),
    PromptFormat(
        name=TOKENIZER_FORMAT,
        description="the chat template shipped with the model's tokenizer",
        render=_tokenizer_template,
    ),
    PromptFormat(
        name=PLAIN_FORMAT,
        description="the text as it is; conversations as a User:/Assistant: transcript",
        render=_plain,
        stop=("\nUser:",),
    ),
)


@hookimpl
def gptq_register_prompt_formats(register):
    for fmt in BUILTIN_FORMATS:
        register(fmt)


def registered_prompt_formats(pm=None) -> dict[str, PromptFormat]:
    """Every prompt format the registered plugins provide, by name; names must be unique."""
    from .plugins import collect_registry, get_plugin_manager

    found = collect_registry(
        (pm or get_plugin_manager()).hook.gptq_register_prompt_formats, "prompt format", PromptFormat
    )
    return {fmt.name: fmt for fmt in found}


# --- which format a model gets ----------------------------------------------------------------------


@dataclass(frozen=True)
class FormatChoice:
    name: str
    reason: str


def model_names(source: ResolvedSource | None) -> list[str]:
    """What a model is called: repo id, what the user wrote, the directory, and config.json's `_name_or_path`."""
    if source is None:
        return []
    names = [source.repo_id or "", source.text, source.path.name]
    try:
        config = json.loads((source.path / "config.json").read_text(encoding="utf-8"))
        names.append(str(config.get("_name_or_path") or ""))
    except (OSError, ValueError, AttributeError):
        pass
    return [n for n in dict.fromkeys(names) if n]


_README_TEMPLATE = re.compile(r"prompt template:\s*([A-Za-z0-9][\w .-]*)", re.IGNORECASE)


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def readme_template(path: Path | None) -> str | None:
    """The 'Prompt template: X' line model cards of quantized models carry (TheBloke's cards do)."""
    if path is None:
        return None
    try:
        head = (path / "README.md").read_text(encoding="utf-8", errors="replace")[:20000]
    except OSError:
        return None
    m = _README_TEMPLATE.search(head)
    return m.group(1).strip() if m else None


def choose_prompt_format(
    tokenizer,
    source: ResolvedSource | None,
    explicit: str | None = None,
    formats: dict[str, PromptFormat] | None = None,
) -> FormatChoice:
    formats = formats if formats is not None else registered_prompt_formats()
    if explicit:
        if explicit not in formats:
            raise GPTQBridgeError(f"prompt_format {explicit!r} is not registered (registered: {', '.join(formats)})")
        if explicit == TOKENIZER_FORMAT and not getattr(tokenizer, "chat_template", None):
            raise GPTQBridgeError(f"prompt_format {explicit!r}: this model's tokenizer has no chat template")
        return FormatChoice(explicit, "chosen explicitly")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None) and TOKENIZER_FORMAT in formats:
        return FormatChoice(TOKENIZER_FORMAT, "the tokenizer has a chat template")
    names = model_names(source)
    for fmt in formats.values():
        for pattern in fmt.model_patterns:
            for name in names:
                if re.search(pattern, name.replace("_", "-").replace(" ", "-"), re.IGNORECASE):
                    return FormatChoice(fmt.name, f"the model name {name!r} matches {pattern!r}")
    hint = readme_template(source.path if source else None)
    if hint:
        for fmt in formats.values():
            if _norm(fmt.name) == _norm(hint):
                return FormatChoice(fmt.name, f"README.md says 'Prompt template: {hint}'")
    return FormatChoice(PLAIN_FORMAT, "no chat template, and nothing in the model's name or files names a format")


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    stop: tuple[str, ...]
    format: str


def render_messages(
    messages: list[ChatMessage | dict],
    format: str,
    *,
    tokenizer=None,
    input: str | None = None,
    formats: dict[str, PromptFormat] | None = None,
) -> RenderedPrompt:
    """Messages to prompt text with the named format, and the stop strings that format implies."""
    formats = formats if formats is not None else registered_prompt_formats()
    if format not in formats:
        raise GPTQBridgeError(f"prompt_format {format!r} is not registered (registered: {', '.join(formats)})")
    merged = merge_messages(messages)
    if not merged:
        raise GPTQBridgeError("messages is empty")
    fmt = formats[format]
    text = fmt.render(merged, tokenizer=tokenizer, input=input)
    if not isinstance(text, str):
        raise GPTQBridgeError(f"prompt format {format!r} rendered {type(text).__name__}, not text")
    stop = fmt.stop + (template_end_of_turn(tokenizer) if format == TOKENIZER_FORMAT else ())
    return RenderedPrompt(text=text, stop=stop, format=format)

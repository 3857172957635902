"""Prompt formats: each one's exact text, merging of messages, the format a model gets, plugin formats."""

from pathlib import Path

import pytest
from gen_models import CHATML_TEMPLATE, byte_level_tokenizer
from tiny_checkpoints import tiny_tokenizer

from gptq_bridge import hookimpl
from gptq_bridge.errors import GPTQBridgeError
from gptq_bridge.prompts import (
    VICUNA_SYSTEM,
    choose_prompt_format,
    merge_messages,
    registered_prompt_formats,
    render_messages,
)
from gptq_bridge.types import ChatMessage, PromptFormat, ResolvedSource

Q = [{"role": "user", "content": "What is the capital of France?"}]
SYS_Q = [{"role": "system", "content": "Be brief."}] + Q
CONVO = SYS_Q + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]


def text(messages, fmt, **kw):
    return render_messages(messages, fmt, **kw).text


def test_alpaca_instruct_only_is_exactly_the_nous_hermes_card():
    assert text(Q, "alpaca-instruct-only") == "### Instruction:\nWhat is the capital of France?\n\n### Response:\n"
    # no input block, even when input is given
    assert "### Input:" not in text(Q, "alpaca-instruct-only", input="ctx")


def test_alpaca_with_and_without_input():
    assert text(Q, "alpaca") == "### Instruction:\nWhat is the capital of France?\n\n### Response:\n"
    assert text(Q, "alpaca", input="Europe") == (
        "### Instruction:\nWhat is the capital of France?\n\n### Input:\nEurope\n\n### Response:\n"
    )


def test_alpaca_conversation_with_system():
    assert text(CONVO, "alpaca") == (
        "Be brief.\n\n"
        "### Instruction:\nWhat is the capital of France?\n\n### Response:\nParis.\n\n"
        "### Instruction:\nAnd of Italy?\n\n### Response:\n"
    )


def test_alpaca_implies_its_stop_strings():
    assert "### Instruction:" in render_messages(Q, "alpaca").stop
    assert "### Instruction:" in render_messages(Q, "alpaca-instruct-only").stop


def test_llama_2_chat():
    assert text(SYS_Q, "llama-2-chat") == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST]"
    )
    assert text(CONVO, "llama-2-chat") == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST] Paris. </s>"
        "<s>[INST] And of Italy? [/INST]"
    )
    assert text(Q, "llama-2-chat") == "<s>[INST] What is the capital of France? [/INST]"


def test_chatml():
    assert text(CONVO, "chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert "<|im_end|>" in render_messages(Q, "chatml").stop


def test_vicuna():
    assert text(Q, "vicuna") == f"{VICUNA_SYSTEM} USER: What is the capital of France? ASSISTANT:"
    assert text(CONVO, "vicuna") == (
        "Be brief. USER: What is the capital of France? ASSISTANT: Paris.</s>USER: And of Italy? ASSISTANT:"
    )


def test_plain():
    assert text(Q, "plain") == "What is the capital of France?"
    assert text(CONVO, "plain") == (
        "System: Be brief.\nUser: What is the capital of France?\nAssistant: Paris.\nUser: And of Italy?\nAssistant:"
    )


def test_tokenizer_chat_template():
    tok = byte_level_tokenizer()
    assert text(SYS_Q, "tokenizer", tokenizer=tok) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_messages(Q, "tokenizer", tokenizer=tok).stop == ("<|im_end|>",)  # the end of a turn
    with pytest.raises(GPTQBridgeError, match="no chat template"):
        text(Q, "tokenizer", tokenizer=tiny_tokenizer())


def test_a_final_assistant_message_is_continued():
    msgs = Q + [{"role": "assistant", "content": "It is"}]
    assert text(msgs, "alpaca").endswith("### Response:\nIt is")
    assert text(msgs, "chatml").endswith("<|im_start|>assistant\nIt is")
    assert text(msgs, "llama-2-chat").endswith("[/INST] It is")


def test_consecutive_same_role_messages_are_merged_and_system_goes_first():
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "system", "content": "s"},
        {"role": "assistant", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    assert merge_messages(msgs) == [
        ChatMessage(role="system", content="s"),
        ChatMessage(role="user", content="a\n\nb"),
        ChatMessage(role="assistant", content="c\n\nd"),
    ]
    assert text(msgs[:2], "alpaca") == "### Instruction:\na\n\nb\n\n### Response:\n"


def test_unknown_format_and_bad_roles_are_errors():
    with pytest.raises(GPTQBridgeError, match="prompt_format 'alpacca' is not registered.*alpaca"):
        render_messages(Q, "alpacca")
    with pytest.raises(Exception, match="role"):
        render_messages([{"role": "robot", "content": "x"}], "alpaca")


def source(tmp_path: Path, dirname: str, repo_id=None, **files) -> ResolvedSource:
    d = tmp_path / dirname
    d.mkdir(parents=True)
    for name, content in files.items():
        (d / name.replace("_", ".")).write_text(content)
    return ResolvedSource(text=repo_id or str(d), path=d, repo_id=repo_id)


def test_format_selection_order(tmp_path):
    plain_tok, template_tok = tiny_tokenizer(), byte_level_tokenizer(CHATML_TEMPLATE)
    hermes = source(tmp_path, "snap1", repo_id="TheBloke/Nous-Hermes-Llama2-70B-GPTQ")
    # a model name that maps to a format
    assert choose_prompt_format(plain_tok, hermes).name == "alpaca"
    # the tokenizer's chat template beats the name
    assert choose_prompt_format(template_tok, hermes).name == "tokenizer"
    # an explicit choice beats both
    assert choose_prompt_format(template_tok, hermes, explicit="vicuna").name == "vicuna"
    # nothing known: plain
    assert choose_prompt_format(plain_tok, source(tmp_path, "mystery")).name == "plain"
    assert choose_prompt_format(None, None).name == "plain"


@pytest.mark.parametrize(
    "dirname,config,expected",
    [
        ("Nous-Hermes-Llama2-70B-GPTQ", "{}", "alpaca"),
        ("nous_hermes_llama_2_7b", "{}", "alpaca"),
        ("model", '{"_name_or_path": "NousResearch/Nous-Hermes-Llama2-13b"}', "alpaca"),
        ("Llama-2-7B-Chat-GPTQ", "{}", "llama-2-chat"),
        ("OpenHermes-2.5-Mistral-7B-GPTQ", "{}", "chatml"),
        ("Nous-Hermes-2-Mixtral-8x7B-DPO-GPTQ", "{}", "chatml"),
        ("vicuna-13B-v1.5-GPTQ", "{}", "vicuna"),
        ("Llama-2-7B-GPTQ", "{}", "plain"),
    ],
)
def test_format_from_the_model_name(tmp_path, dirname, config, expected):
    choice = choose_prompt_format(tiny_tokenizer(), source(tmp_path, dirname, config_json=config))
    assert choice.name == expected, choice.reason


def test_format_from_the_readme(tmp_path):
    readme = "# Some model\n\n## Prompt template: Vicuna\n\n```\nUSER: {prompt} ASSISTANT:\n```\n"
    choice = choose_prompt_format(tiny_tokenizer(), source(tmp_path, "some-model", README_md=readme))
    assert choice.name == "vicuna" and "README" in choice.reason


def test_explicit_choice_errors(tmp_path):
    with pytest.raises(GPTQBridgeError, match="'nope' is not registered"):
        choose_prompt_format(tiny_tokenizer(), None, explicit="nope")
    with pytest.raises(GPTQBridgeError, match="no chat template"):
        choose_prompt_format(tiny_tokenizer(), None, explicit="tokenizer")


class ZephyrPlugin:
    @hookimpl
    def gptq_register_prompt_formats(self, register):
        register(
            PromptFormat(
                name="zephyr",
                description="test format",
                render=lambda messages, **kw: (
                    "".join(f"<|{m.role}|>\n{m.content}</s>\n" for m in messages) + "<|assistant|>\n"
                ),
                stop=("</s>",),
                model_patterns=(r"zephyr",),
            )
        )


def test_a_plugin_adds_a_format(tmp_path, plugin):
    plugin(ZephyrPlugin())
    formats = registered_prompt_formats()
    assert "zephyr" in formats and "alpaca" in formats
    assert text(Q, "zephyr") == "<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n"
    assert choose_prompt_format(tiny_tokenizer(), source(tmp_path, "zephyr-7b-beta-GPTQ")).name == "zephyr"


def test_two_formats_of_one_name_are_refused(plugin):
    class Clash:
        @hookimpl
        def gptq_register_prompt_formats(self, register):
            register(PromptFormat(name="alpaca", description="again", render=lambda m, **kw: ""))

    plugin(Clash())
    with pytest.raises(GPTQBridgeError, match="'alpaca'"):
        registered_prompt_formats()

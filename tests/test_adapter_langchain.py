"""LangChain adapter: the standard chat-model suites of `langchain-tests`, and the LLM's own tests."""

import asyncio

import pytest
from adapter_models import adapter_source
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from gptq_bridge.adapters.langchain import GPTQLLM, ChatGPTQ
from gptq_bridge.default_model import NAME
from gptq_bridge.errors import GPTQBridgeError
from gptq_bridge.model_cache import shared_models

pytestmark = pytest.mark.usefixtures("default_model")
PARAMS = {"max_tokens": 12}


class TestChatGPTQUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self):
        return ChatGPTQ

    @property
    def chat_model_params(self):
        return {"model": adapter_source()}


class TestChatGPTQIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self):
        return ChatGPTQ

    @property
    def chat_model_params(self):
        return {"model": adapter_source(), **PARAMS}

    @property
    def has_tool_calling(self):
        return False

    @property
    def has_structured_output(self):
        return False

    @property
    def supports_image_inputs(self):
        return False


class Tokens(BaseCallbackHandler):
    def __init__(self):
        self.tokens = []

    def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


@pytest.fixture
def llm():
    return GPTQLLM(model=adapter_source(), max_tokens=6, model_kwargs={"ban_eos": True})


def test_llm_invoke_batch_and_stream_agree(llm):
    text = llm.invoke("the cat sat")
    assert text and llm.batch(["the cat sat", "the cat sat"]) == [text, text]  # greedy: deterministic
    assert "".join(llm.stream("the cat sat")) == text


def test_llm_async(llm):
    async def main():
        text = await llm.ainvoke("the dog ran")
        pieces = [p async for p in llm.astream("the dog ran")]
        return text, "".join(pieces)

    text, streamed = asyncio.run(main())
    assert text and text == streamed


def test_llm_stop_is_honoured_in_invoke_and_stream(llm):
    full = GPTQLLM(model=adapter_source(), max_tokens=12, model_kwargs={"ban_eos": True}).invoke("the")
    stop = full[3:5]  # a piece of what greedy decoding says: generation must end before it
    assert stop and stop in full
    cut = full[: full.index(stop)]
    longer = GPTQLLM(model=adapter_source(), max_tokens=12, model_kwargs={"ban_eos": True})
    assert longer.invoke("the", stop=[stop]) == cut
    assert "".join(longer.stream("the", stop=[stop])) == cut
    assert (
        GPTQLLM(model=adapter_source(), max_tokens=12, stop=[stop], model_kwargs={"ban_eos": True}).invoke("the") == cut
    )


def test_llm_callbacks_get_each_token(llm):
    handler = Tokens()
    text = llm.invoke("the cat", config={"callbacks": [handler]})
    assert len(handler.tokens) >= 2 and "".join(handler.tokens) == text


def test_prompt_llm_parser_chain(llm):
    chain = PromptTemplate.from_template("Tell me about {topic}.") | llm | StrOutputParser()
    assert chain.invoke({"topic": "cats"}) == llm.invoke("Tell me about cats.")


def test_get_num_tokens_uses_the_model_tokenizer(llm):
    tokenizer = shared_models().get(adapter_source()).tokenizer
    assert llm.get_num_tokens("the cat sat on the mat") == len(tokenizer.encode("the cat sat on the mat"))


def test_chat_usage_and_model_name_once_on_final_chunk():
    chat = ChatGPTQ(model=adapter_source(), **PARAMS)
    chunks = list(chat.stream([SystemMessage("be brief"), HumanMessage("hi"), HumanMessage("there")]))
    with_usage = [c for c in chunks if c.usage_metadata]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1]
    assert 0 < chunks[-1].usage_metadata["output_tokens"] <= 12
    assert chunks[-1].response_metadata["model_name"] == NAME
    assert chunks[-1].response_metadata["finish_reason"] in ("length", "stop", "eos")


def test_chat_merges_consecutive_same_role_messages():
    from gptq_bridge.adapters.langchain import to_chat_messages
    from gptq_bridge.prompts import merge_messages

    merged = merge_messages(to_chat_messages([HumanMessage("a"), HumanMessage("b"), AIMessage("c")]))
    assert [m.role for m in merged] == ["user", "assistant"] and "a" in merged[0].content and "b" in merged[0].content


def test_tool_messages_are_refused_by_name():
    chat = ChatGPTQ(model=adapter_source(), **PARAMS)
    with pytest.raises(GPTQBridgeError, match="ToolMessage messages are not supported"):
        chat.invoke([HumanMessage("hi"), ToolMessage("x", tool_call_id="1")])


def test_adapters_share_the_loaded_model():
    a = ChatGPTQ(model=adapter_source(), **PARAMS)
    b = GPTQLLM(model=adapter_source(), max_tokens=4)
    default = ChatGPTQ(max_tokens=4)  # no model named: the embedded default model, the same object
    assert a._loaded() is b._loaded() is default._loaded()


def test_answers_from_the_default_model():
    # a question whose answer the prepared model decides by a wide margin (test_default_model.SMOKE_QUESTIONS)
    reply = ChatGPTQ(max_tokens=48).invoke("What is the capital of Japan?")
    assert "Tokyo" in reply.content


def test_prompt_format_applies_to_chat_only():
    chat = ChatGPTQ(model=adapter_source(), prompt_format="alpaca", **PARAMS)
    llm = GPTQLLM(model=adapter_source(), prompt_format="alpaca", max_tokens=4, model_kwargs={"ban_eos": True})
    reply = chat.invoke("hi")
    assert reply.content and llm.invoke("the cat")  # the completion is sent as it is, not refused
    assert "### Instruction:" not in reply.content

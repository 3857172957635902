"""LlamaIndex adapter: every method, streaming deltas, stop, async that leaves the loop free, a query engine."""

import asyncio
import re
import time
import zlib

import pytest
from adapter_models import adapter_source
from llama_index.core import Document, PromptTemplate, Settings, VectorStoreIndex
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.embeddings import BaseEmbedding, MockEmbedding
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMChatStartEvent
from llama_index.core.llms import ChatMessage

from gptq_bridge.adapters.llamaindex import GPTQLLM
from gptq_bridge.default_model import NAME
from gptq_bridge.errors import GPTQBridgeError

pytestmark = pytest.mark.usefixtures("default_model")


@pytest.fixture
def llm():
    return GPTQLLM(model=adapter_source(), max_new_tokens=8, generate_kwargs={"ban_eos": True})


MESSAGES = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="the cat")]


def test_real_metadata(llm):
    meta = llm.metadata
    assert meta.context_window == 8192  # SmolLM2's max_position_embeddings
    assert meta.num_output == 8 and meta.is_chat_model and meta.model_name == NAME
    assert GPTQLLM(model=adapter_source(), context_window=128).metadata.context_window == 128


def test_llamaindex_drives_it_as_a_chat_model(llm):
    """LlamaIndex's own machinery, not the adapter, decides what is sent: a chat engine keeps the conversation
    in its memory and sends it whole each turn, and `predict` goes through chat because the metadata says so."""
    engine = SimpleChatEngine.from_defaults(llm=llm, system_prompt="be brief")
    first = engine.chat("the cat").response
    assert first and first == llm.chat(MESSAGES).message.content
    second = engine.chat("and the dog").response
    history = [*MESSAGES, ChatMessage(role="assistant", content=first), ChatMessage(role="user", content="and the dog")]
    assert second == llm.chat(history).message.content
    assert [m.content for m in engine.chat_history] == ["the cat", first, "and the dog", second]
    assert llm.predict(PromptTemplate("the {animal}"), animal="cat") == llm.chat(MESSAGES[1:]).message.content


def test_complete_and_stream_complete(llm):
    text = llm.complete("the cat sat").text
    chunks = list(llm.stream_complete("the cat sat"))
    assert text and chunks[-1].text == text
    assert "".join(c.delta for c in chunks) == text
    assert all(b.text.startswith(a.text) for a, b in zip(chunks, chunks[1:]))  # cumulative


def test_chat_and_stream_chat(llm):
    reply = llm.chat(MESSAGES)
    chunks = list(llm.stream_chat(MESSAGES))
    assert reply.message.role == "assistant" and reply.message.content
    assert chunks[-1].message.content == reply.message.content == "".join(c.delta for c in chunks)
    assert reply.raw["usage"]["completion_tokens"] == 8


def test_stop(llm):
    full = GPTQLLM(model=adapter_source(), max_new_tokens=12, generate_kwargs={"ban_eos": True}).complete("the").text
    stop = full[3:5]
    assert stop
    cut = full[: full.index(stop)]
    stopped = GPTQLLM(model=adapter_source(), max_new_tokens=12, stop=[stop], generate_kwargs={"ban_eos": True})
    assert stopped.complete("the").text == cut
    assert stopped.complete("the").raw["finish_reason"] == "stop"


def test_async_variants_match_and_do_not_block_the_loop(llm):
    async def main():
        ticks = 0
        stop_ticking = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop_ticking.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        slow = GPTQLLM(model=adapter_source(), max_new_tokens=48, generate_kwargs={"ban_eos": True})
        start = time.perf_counter()
        text = (await slow.acomplete("the cat")).text
        elapsed = time.perf_counter() - start
        chat = (await llm.achat(MESSAGES)).message.content
        streamed = [c async for c in await llm.astream_complete("the cat sat")]
        chat_streamed = [c async for c in await llm.astream_chat(MESSAGES)]
        stop_ticking.set()
        await task
        return text, elapsed, ticks, chat, streamed, chat_streamed

    text, elapsed, ticks, chat, streamed, chat_streamed = asyncio.run(main())
    assert text and chat == llm.chat(MESSAGES).message.content
    assert streamed[-1].text == llm.complete("the cat sat").text
    assert "".join(c.delta for c in chat_streamed) == chat
    # the loop kept running while the 48 tokens were generated in a worker thread
    assert ticks >= 3, f"only {ticks} ticks in {elapsed:.3f} s: the event loop was blocked"


def test_tool_role_is_refused(llm):
    with pytest.raises(GPTQBridgeError, match="role 'tool' are not supported"):
        llm.chat([ChatMessage(role="tool", content="x")])


class _ChatRecorder(BaseEventHandler):
    """Keeps what the query engine sent to the LLM and what came back, through LlamaIndex's instrumentation."""

    seen: list = []

    def handle(self, event, **kwargs):
        if isinstance(event, (LLMChatStartEvent, LLMChatEndEvent)):
            self.seen.append(event)


@pytest.fixture
def default_llm_settings():
    Settings.llm = GPTQLLM(max_new_tokens=32)  # no model named: the embedded default model
    Settings.embed_model = MockEmbedding(embed_dim=8)
    yield Settings.llm
    Settings.llm = None
    Settings.embed_model = None


def test_query_engine_puts_retrieved_documents_before_the_llm(default_llm_settings):
    docs = [
        Document(text="The meeting about the new bridge is on Thursday in room 4B."),
        Document(text="Lunch is served in the cafeteria from noon."),
    ]
    recorder = _ChatRecorder(seen=[])
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(recorder)
    try:
        engine = VectorStoreIndex.from_documents(docs).as_query_engine(similarity_top_k=2)
        response = engine.query("In which room is the meeting about the bridge?")
    finally:
        dispatcher.event_handlers.remove(recorder)
    assert {n.node.get_content() for n in response.source_nodes} == {d.text for d in docs}
    start = next(e for e in recorder.seen if isinstance(e, LLMChatStartEvent))
    prompt = "\n".join(m.content for m in start.messages)
    assert all(d.text in prompt for d in docs) and "In which room" in prompt
    # the engine's answer is exactly the model's greedy answer to that prompt
    assert str(response) == default_llm_settings.chat(start.messages).message.content.strip()


class WordCountEmbedding(BaseEmbedding):
    """A small real embedding, offline: counts of each lower-cased word hashed into 64 buckets (deterministic,
    unlike MockEmbedding's constant vectors, so retrieval ranks the document that shares the question's words)."""

    def _embed(self, text: str) -> list[float]:
        vec = [0.0] * 64
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            vec[zlib.crc32(word.encode()) % 64] += 1.0
        return vec

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed(text)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._embed(query)


def test_query_engine_answers_from_the_retrieved_document(default_llm_settings):
    Settings.embed_model = WordCountEmbedding()
    docs = [
        Document(text="Lunch is served in the cafeteria from noon."),
        Document(text="The meeting about the new bridge is on Thursday in room 4B."),
        Document(text="Parking passes are renewed every January at the front desk."),
    ]
    engine = VectorStoreIndex.from_documents(docs).as_query_engine(similarity_top_k=1)
    response = engine.query("In which room is the meeting about the bridge?")
    assert [n.node.get_content() for n in response.source_nodes] == [docs[1].text]
    assert "4B" in str(response)

"""`gptq-bridge serve` with the embedded default model: LangChain's `ChatOpenAI` through langchain-tests' standard
chat suite, and the real command stopped by SIGTERM while a stream is in flight."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from adapter_models import adapter_source
from test_openai_server import Server, sse_events

from gptq_bridge.adapters.openai_server import ServerOptions, create_app
from gptq_bridge.default_model import NAME
from gptq_bridge.model_cache import shared_models

httpx = pytest.importorskip("httpx")
langchain_openai = pytest.importorskip("langchain_openai")
from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402

pytestmark = pytest.mark.usefixtures("default_model")
SERVED: dict[str, str] = {}  # the module server's base URL, read by the suite's chat_model_params


@pytest.fixture(scope="module", autouse=True)
def default_model_server(default_model):
    server = Server(create_app(shared_models().get(adapter_source()), ServerOptions(model_name=NAME)))
    SERVED["url"] = server.url + "/v1"
    yield server
    server.stop()


class TestChatOpenAIAgainstServe(ChatModelIntegrationTests):
    """The standard suite, with `ChatOpenAI` as the chat model and this server as its OpenAI. Tool calling,
    structured output, JSON mode and images are declared unsupported through the suite's own properties (the
    server answers them with a 400 naming the field)."""

    # langchain-openai keeps one async HTTP client per base URL for the whole process, and its pooled connections
    # belong to the event loop that opened them: the suite's async tests share one loop, as an application would
    # (the mark reaches the suite's sync tests too, where pytest-asyncio warns that it does nothing)
    pytestmark = [
        pytest.mark.asyncio(loop_scope="class"),
        pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio'"),
    ]

    @property
    def chat_model_class(self):
        return langchain_openai.ChatOpenAI

    @property
    def chat_model_params(self):
        return {
            "model": NAME,
            "base_url": SERVED["url"],
            "api_key": "unused",
            "max_tokens": 12,
            "temperature": 0,
            "max_retries": 0,
            "timeout": 120,
            "stream_usage": True,  # usage in streams: the server sends it when stream_options asks
        }

    @property
    def has_tool_calling(self):
        return False

    @property
    def has_structured_output(self):
        return False

    @property
    def supports_json_mode(self):
        return False

    @property
    def supports_image_inputs(self):
        return False

    @property
    def supports_model_override(self):
        return False  # one model per server: another model name is a 404 by design


def test_chat_openai_answers_with_the_default_model(default_model_server):
    from langchain_core.messages import HumanMessage

    chat = langchain_openai.ChatOpenAI(
        model=NAME, base_url=SERVED["url"], api_key="unused", temperature=0, max_tokens=12, max_retries=0
    )
    reply = chat.invoke([HumanMessage("What is the capital of Japan?")])
    assert "Tokyo" in reply.content
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    assert reply.usage_metadata["output_tokens"] >= 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # the default model goes on counting: no early end of text


def test_sigterm_lets_the_stream_in_flight_finish_then_exits_0(default_model):
    """The real command: SIGTERM mid-stream closes the listening socket at once (new connections are refused),
    the stream in flight runs to its last token and [DONE], and the process then exits with status 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "gptq_bridge.cli", "serve", "--model", str(default_model), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"prompt": COUNTING, "max_tokens": 48, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            while True:  # the listening socket closes at the signal, while the stream goes on
                try:
                    httpx.get(url + "/health", timeout=2)
                    assert time.monotonic() < deadline, "the server still accepts connections after SIGTERM"
                    time.sleep(0.02)
                except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                    break  # refused, or (a connection that raced the closing socket) reset unanswered
            refused_at = time.monotonic()
            rest = sse_events(lines)
            done_at = time.monotonic()
        events = [json.loads(first[len("data: ") :])] + rest
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
        assert events[-2]["usage"]["completion_tokens"] == 48 and text.startswith(" 11, 12"), text
        assert done_at > refused_at
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait()

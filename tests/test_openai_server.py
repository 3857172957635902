"""The OpenAI-compatible server: a real uvicorn server on 127.0.0.1 and the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch
from gen_models import byte_checkpoint

import gptq_bridge
from gptq_bridge.adapters.openai_server import ServerOptions, create_app

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")


class Server:
    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return byte_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def lm(model_path):
    return gptq_bridge.load_model(str(model_path))


@pytest.fixture(scope="module")
def server(lm):
    s = Server(create_app(lm, ServerOptions(model_name="tiny")))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


MESSAGES = [{"role": "user", "content": "the cat sat"}]


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_completion_is_the_model_s_own_answer(client, lm):
    want = lm.generate(MESSAGES, max_new_tokens=12, ban_eos=False)
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
        want.usage.prompt_tokens,
        want.usage.completion_tokens,
    )
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_streamed_chat_adds_up_to_the_answer_and_reports_usage(client, lm):
    want = lm.generate(MESSAGES, max_new_tokens=16)
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
        ["length"],
        ["stop"],
    )
    assert chunks[-1].usage.completion_tokens == want.usage.completion_tokens and not chunks[-1].choices


def test_completions_sync_async_and_streamed(server, client, lm):
    want = lm.generate("the cat", max_new_tokens=10)
    got = client.completions.create(model="tiny", prompt="the cat", max_tokens=10)
    assert got.choices[0].text == want.text and got.usage.completion_tokens == want.usage.completion_tokens

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        whole = await aclient.completions.create(model="tiny", prompt="the cat", max_tokens=10)
        parts = [
            c.choices[0].text
            async for c in await aclient.completions.create(model="tiny", prompt="the cat", max_tokens=10, stream=True)
        ]
        await aclient.close()
        return whole.choices[0].text, "".join(parts)

    assert asyncio.run(run()) == (want.text, want.text)


def test_32_streaming_clients_at_once_each_get_their_own_answer(server, lm):
    prompts = [f"the {'cat ' * (i % 5)}sat on {i}" for i in range(32)]
    alone = {p: lm.generate(p, max_new_tokens=20, ban_eos=True).text for p in prompts}
    results: dict[str, str] = {}
    start = threading.Barrier(len(prompts))

    def run(p):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        start.wait()
        stream = c.completions.create(model="tiny", prompt=p, max_tokens=20, stream=True, extra_body={})
        results[p] = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    # greedy answers: batched or alone, the same (ban_eos is not an OpenAI field, so the alone runs may stop
    # earlier at EOS; compare up to the shorter)
    for p in prompts:
        got, want = results[p], alone[p]
        assert got[: len(want)] == want or want[: len(got)] == got, p


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, lm):
    from gptq_bridge.engine.generator import engine_for

    alloc = engine_for(lm).forward.cache.allocator
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
        assert alloc.free_blocks < alloc.usable_blocks  # it holds cache blocks while it streams
    deadline = time.monotonic() + 10
    while alloc.free_blocks < alloc.usable_blocks:
        assert time.monotonic() < deadline, "the disconnected request still holds its blocks"
        time.sleep(0.02)


class HeldHead(torch.nn.Module):
    """The model's own output head, which waits for `go` before answering: a request holds its place."""

    def __init__(self, head):
        super().__init__()
        self.head, self.go = head, threading.Event()

    def forward(self, hidden):
        self.go.wait(timeout=60)
        return self.head(hidden)


def test_a_full_queue_answers_429_and_a_wrong_key_401(model_path):
    held = gptq_bridge.load_model(str(model_path))
    head = HeldHead(held.model.lm_head)
    held.model.lm_head = head
    s = Server(create_app(held, ServerOptions(model_name="tiny", api_key="sesame", max_queue=1)))
    try:
        headers = {"Authorization": "Bearer sesame"}
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        err = httpx.get(s.url + "/v1/models").json()["error"]
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/health").status_code == 200  # health needs no key
        body = {"messages": MESSAGES, "max_tokens": 5, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
            lines = r.iter_lines()  # one iterator: a dropped one closes the connection
            next(lines)  # the role chunk: the request is in, its generation waits at the head
            busy = httpx.post(s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=headers)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "rate_limit_error"
            head.go.set()
            assert "data: [DONE]" in list(lines)
        ok = httpx.post(s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=headers)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    finally:
        head.go.set()
        s.stop()


BAD = [
    ("chat", b"{not json", 400, None),
    ("chat", b"[1, 2]", 400, None),
    ("chat", b'"a string"', 400, None),
    ("chat", {"model": "tiny"}, 400, "messages"),
    ("chat", {"messages": []}, 400, "messages"),
    ("chat", {"messages": "hi"}, 400, "messages"),
    ("chat", {"messages": [1]}, 400, "messages[0]"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (
        "chat",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content",
    ),
    ("chat", {"model": "gpt-4", "messages": MESSAGES}, 404, "model"),
    ("chat", {"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"messages": MESSAGES, "max_tokens": "ten"}, 400, "max_tokens"),
    ("chat", {"messages": MESSAGES, "max_tokens": 10**9}, 400, "max_tokens"),
    ("chat", {"messages": MESSAGES, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("chat", {"messages": MESSAGES, "temperature": -1}, 400, "temperature"),
    ("chat", {"messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ("chat", {"messages": MESSAGES, "top_p": 0}, 400, "top_p"),
    ("chat", {"messages": MESSAGES, "top_p": 1.5}, 400, "top_p"),
    ("chat", {"messages": MESSAGES, "presence_penalty": 3}, 400, "presence_penalty"),
    ("chat", {"messages": MESSAGES, "frequency_penalty": True}, 400, "frequency_penalty"),
    ("chat", {"messages": MESSAGES, "seed": -1}, 400, "seed"),
    ("chat", {"messages": MESSAGES, "stop": 5}, 400, "stop"),
    ("chat", {"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("chat", {"messages": MESSAGES, "stop": [""]}, 400, "stop"),
    ("chat", {"messages": MESSAGES, "n": 2}, 400, "n"),
    ("chat", {"messages": MESSAGES, "logprobs": True}, 400, "logprobs"),
    ("chat", {"messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools"),
    ("chat", {"messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    ("chat", {"messages": MESSAGES, "user": 7}, 400, "user"),
    ("completions", {"prompt": 5}, 400, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {}, 400, "prompt"),
    ("completions", {"prompt": "a", "echo": True}, 400, "echo"),
    ("completions", {"prompt": "a", "suffix": "b"}, 400, "suffix"),
    ("completions", {"prompt": "x" * (2 << 20)}, 413, None),
]


def test_malformed_requests_get_openai_errors_and_the_server_goes_on(server, client):
    assert len(BAD) >= 30
    for endpoint, body, status, param in BAD:
        url = f"{server.url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}"
        r = (
            httpx.post(url, content=body, headers={"content-type": "application/json"})
            if isinstance(body, bytes)
            else httpx.post(url, json=body)
        )
        assert r.status_code == status, (body if isinstance(body, bytes) else json.dumps(body)[:200], r.text[:300])
        err = r.json()["error"]
        assert err["message"] and err["param"] == param, (body, err)
    assert httpx.post(server.url + "/v1/nothing-here", json={}).status_code == 404
    assert client.completions.create(model="tiny", prompt="the", max_tokens=3).usage.completion_tokens >= 1

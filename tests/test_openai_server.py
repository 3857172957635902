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
from gptq_bridge.adapters.openai_server import ServerOptions, create_app, finish_reason

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


def test_tools_offered_are_never_called_and_the_answer_is_text(client, lm):
    """Frontends (Open WebUI) send their tools with every request; under tool_choice auto the answer is text."""
    want = lm.generate(MESSAGES, max_new_tokens=8)
    tool = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, tools=[tool])
    assert got.choices[0].message.content == want.text and not got.choices[0].message.tool_calls


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


def sse_events(lines) -> list:
    """The JSON payloads of a server-sent event stream, and "[DONE]" for its end marker."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


class HeldHead(torch.nn.Module):
    """The model's own output head, which waits for `go` before answering: a request holds its place."""

    def __init__(self, head):
        super().__init__()
        self.head, self.go = head, threading.Event()

    def forward(self, hidden):
        self.go.wait(timeout=60)
        return self.head(hidden)


def wait_until(condition, what: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_32_streaming_clients_at_once_each_get_their_own_answer(server, lm):
    """Each of 32 concurrent greedy streams (half chat, half completions) is exactly the same request run alone:
    same text, same finish_reason, same usage; every stream ends with [DONE] under an id of its own."""
    from gptq_bridge.adapters.openai_server import chat_messages, completion_prompt, generation_kwargs
    from gptq_bridge.engine.generator import engine_for

    bodies = []
    for i in range(32):
        words = f"the {'cat ' * (i % 5)}sat on {i}"
        body = {"max_tokens": 8 + i % 13, "stream": True, "stream_options": {"include_usage": True}}
        if i % 2:
            body |= {"messages": [{"role": "user", "content": words}]}
        else:
            body |= {"prompt": words}
        bodies.append(body)

    def alone(body):
        prompt = chat_messages(body) if "messages" in body else completion_prompt(body)
        return lm.generate(prompt, **generation_kwargs(body, None))

    want = [alone(b) for b in bodies]  # one at a time, through the same engine
    assert len({w.text for w in want}) > 16  # different answers: a mix-up would show

    engine = engine_for(lm)
    batch_sizes: list[int] = []
    decode = engine.decode

    def recording_decode(batch, feed=None):
        batch_sizes.append(len(batch))
        return decode(batch, feed)

    engine.decode = recording_decode
    head = lm.model.lm_head = HeldHead(lm.model.lm_head)  # the first step waits until all 32 are in
    results: dict[int, list] = {}
    go = threading.Barrier(len(bodies))

    def run(i):
        url = server.url + ("/v1/chat/completions" if "messages" in bodies[i] else "/v1/completions")
        with httpx.Client(timeout=120) as c:
            go.wait()
            with c.stream("POST", url, json=bodies[i]) as r:
                assert r.status_code == 200
                results[i] = sse_events(r.iter_lines())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: len(engine.scheduler.waiting) + len(engine.scheduler.running) == 32, "not all 32 came in")
        head.go.set()
        for t in threads:
            t.join(timeout=120)
    finally:
        head.go.set()
        engine.decode, lm.model.lm_head = decode, head.head
    assert sorted(results) == list(range(32)), "a stream was lost"
    assert max(batch_sizes) >= 8, batch_sizes  # they shared the batch
    ids = set()
    completion_total = 0
    for i, events in results.items():
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        chunks = events[:-1]
        assert len({c["id"] for c in chunks}) == 1, f"stream {i} carries more than one id"
        ids.add(chunks[0]["id"])
        chat = "messages" in bodies[i]
        text = "".join(
            (c["choices"][0]["delta"].get("content") or "") if chat else c["choices"][0]["text"]
            for c in chunks
            if c["choices"]
        )
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        usage = chunks[-1]["usage"]
        assert text == want[i].text, i
        assert finish == [finish_reason(want[i].finish_reason)], i
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
            want[i].usage.prompt_tokens,
            want[i].usage.completion_tokens,
        ), i
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        completion_total += usage["completion_tokens"]
    assert len(ids) == 32
    assert completion_total == sum(w.usage.completion_tokens for w in want)


class GatedHead(torch.nn.Module):
    """The model's own output head, run one call per permit: the test decides when each engine step ends."""

    def __init__(self, head):
        super().__init__()
        self.head, self.permits, self.calls = head, threading.Semaphore(0), 0

    def forward(self, hidden):
        assert self.permits.acquire(timeout=60), "no permit for a head call"
        self.calls += 1
        return self.head(hidden)


def test_a_client_that_disconnects_mid_stream_is_cancelled_within_one_step_and_frees_its_slot(model_path):
    """The engine is held inside a decode step when the client goes: that step ends, no other runs for it, its
    cache blocks and batch row are free, and the server's request count is back to 0."""
    from gptq_bridge.engine.generator import engine_for

    gated = gptq_bridge.load_model(str(model_path))
    head = GatedHead(gated.model.lm_head)
    gated.model.lm_head = head
    engine = engine_for(gated)
    alloc = engine.forward.cache.allocator
    s = Server(create_app(gated, ServerOptions(model_name="tiny")))
    try:
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            for _ in range(6):  # the prefill, then 5 decode steps
                head.permits.release()
            wait_until(lambda: head.calls == 6, "the engine did not run 6 head calls")
            [seq] = engine.scheduler.running
            assert seq.generated == 6 and alloc.free_blocks < alloc.usable_blocks
            lines = r.iter_lines()  # one iterator: a dropped one closes the connection
            assert next(lines).startswith("data: ")  # tokens are streaming
            assert httpx.get(s.url + "/health").json()["active_requests"] == 1
            # the engine now waits inside its 7th head call, holding the step
        wait_until(lambda: seq.cancelled, "the server did not cancel the generation of a gone client")
        for _ in range(50):
            head.permits.release()  # the engine could go on for 50 more steps, if it did not stop
        wait_until(lambda: seq.finish_reason is not None, "the request did not end")
        assert seq.finish_reason == "cancelled"
        assert head.calls == 7 and seq.generated == 7  # the step under way ended, and no other ran
        assert alloc.free_blocks == alloc.usable_blocks and engine.scheduler.running == []
        wait_until(lambda: httpx.get(s.url + "/health").json()["active_requests"] == 0, "the slot is still held")
        ok = httpx.post(s.url + "/v1/completions", json={"prompt": "the", "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    finally:
        for _ in range(500):
            head.permits.release()
        s.stop()


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
    ("chat", {"messages": MESSAGES, "tools": {"type": "function"}}, 400, "tools"),
    ("chat", {"messages": MESSAGES, "tools": [{"type": "function"}], "tool_choice": "required"}, 400, "tool_choice"),
    ("chat", {"messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    ("chat", {"messages": MESSAGES, "user": 7}, 400, "user"),
    ("completions", {"prompt": 5}, 400, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {}, 400, "prompt"),
    ("completions", {"prompt": "a", "echo": True}, 400, "echo"),
    ("completions", {"prompt": "a", "suffix": "b"}, 400, "suffix"),
    ("completions", {"prompt": "x" * (2 << 20)}, 413, None),
    ("chat", b"[" * 200_000 + b"]" * 200_000, 400, None),  # nested past the JSON parser's recursion limit
    ("chat", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    ("chat", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}', 400, "max_tokens"),
    ("chat", b"\xff\xfe{", 400, None),
    ("chat", b"", 400, None),
    ("chat", {"messages": MESSAGES, "seed": 2**64}, 400, "seed"),
    ("chat", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("chat", {"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {"messages": MESSAGES, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("completions", {"prompt": "a", "max_tokens": 256}, 400, "max_tokens"),  # no room left in the context
    ("completions", {"prompt": ""}, 400, "prompt"),  # nothing to start from: the tokenizer has no BOS
]


def test_malformed_requests_get_openai_errors_and_the_server_goes_on(server, client):
    assert len(BAD) >= 40
    for endpoint, body, status, param in BAD:
        url = f"{server.url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}"
        r = (
            httpx.post(url, content=body, headers={"content-type": "application/json"})
            if isinstance(body, bytes)
            else httpx.post(url, json=body)
        )
        assert r.status_code == status, (body if isinstance(body, bytes) else json.dumps(body)[:200], r.text[:300])
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error" and err["param"] == param, (body, err)
    assert httpx.post(server.url + "/v1/nothing-here", json={}).status_code == 404
    assert client.completions.create(model="tiny", prompt="the", max_tokens=3).usage.completion_tokens >= 1


def test_a_request_past_its_deadline_ends_with_length_and_cors_is_asked_for(model_path):
    gated = gptq_bridge.load_model(str(model_path))
    head = GatedHead(gated.model.lm_head)
    gated.model.lm_head = head
    options = ServerOptions(model_name="tiny", timeout_s=0.3, cors_origins=("http://localhost:3000",))
    s = Server(create_app(gated, options))
    try:
        for _ in range(4):  # the prefill and 3 tokens, then the engine waits past the deadline
            head.permits.release()
        body = {"prompt": "the cat", "max_tokens": 100}
        threading.Timer(1.0, lambda: [head.permits.release() for _ in range(200)]).start()
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=30).json()
        assert r["choices"][0]["finish_reason"] == "length" and 3 <= r["usage"]["completion_tokens"] < 10, r
        preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
        ok = httpx.options(s.url + "/v1/chat/completions", headers=preflight)
        assert ok.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.options(s.url + "/v1/chat/completions", headers=preflight | {"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        for _ in range(500):
            head.permits.release()
        s.stop()


def test_cors_is_off_unless_asked_for(server):
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=preflight)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers

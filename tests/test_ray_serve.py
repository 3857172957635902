"""Replicas of the OpenAI server under Ray Serve: a local Ray instance (2 CPUs, 127.0.0.1), two replicas of the
embedded default model, the official `openai` client.

The questions are ones the default model answers right with a margin of more than 2 logits at every step up to
the answer, so batching and thread counts cannot change them.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from gptq_bridge.quality import answer_found

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from gptq_bridge.adapters.ray_serve import (  # noqa: E402 - needs ray
    APP_NAME,
    REPLICA_HEADER,
    ReplicaSettings,
    build_app,
    estimate_tokens,
)

QUESTIONS = {
    "What is the chemical symbol for iron?": "Fe",
    "What is the capital of South Korea?": "Seoul",
    "What is the capital of the Netherlands?": "Amsterdam",
    "What is the chemical symbol for gold?": "Au",
    "What is the capital of China?": "Beijing",
    "What is the capital of the Czech Republic?": "Prague",
    "What is the capital of Japan?": "Tokyo",
    "What is the capital of Sweden?": "Stockholm",
}
LONG = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(default_model):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # tests never touch the network
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 * 1024, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ReplicaSettings(model=str(default_model), replicas=2, device="cpu", replica_cpus=1, max_queue=16)
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=30).json()


def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_token_estimate_is_the_prompt_and_max_tokens():
    body = b'{"messages": [{"role": "user", "content": "12345678"}], "max_tokens": 10}'
    assert estimate_tokens(body) == 2 + 10
    assert estimate_tokens(b'{"prompt": "abcd"}') == 1 + 256
    assert estimate_tokens(b"not json") == 1


def test_settings_from_serve_run_arguments_name_the_bad_key():
    s = ReplicaSettings.from_args({"model": "./m", "replicas": "3", "trust_remote_code": "true", "replica_cpus": "2"})
    assert (s.model, s.replicas, s.trust_remote_code, s.cpus()) == ("./m", 3, True, 2.0)
    with pytest.raises(Exception, match="replcas: not a setting"):
        ReplicaSettings.from_args({"replcas": "2"})
    with pytest.raises(Exception, match="replicas: 'two' is not a valid int"):
        ReplicaSettings.from_args({"replicas": "two"})
    with pytest.raises(Exception, match="replicas: expected a whole number"):
        ReplicaSettings(replicas=0)


def test_serve_command_refuses_a_bad_replica_count_before_starting_ray(capsys):
    from gptq_bridge import cli

    assert cli.main(["serve", "--ray-address", "auto"]) == 1
    assert "--replicas: expected a whole number of at least 1, got None" in capsys.readouterr().err
    assert cli.main(["serve", "--replicas", "0"]) == 1
    assert "--replicas: expected a whole number of at least 1, got 0" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_more_replicas_than_the_cluster_holds_are_refused(url):
    from gptq_bridge.adapters.ray_serve import check_resources

    with pytest.raises(Exception, match=r"--replicas 3: needs 3 CPUs \(1 each\), the Ray cluster has 2"):
        check_resources(ReplicaSettings(replicas=3, replica_cpus=1, device="cpu"))


def test_16_streaming_clients_get_right_answers_from_both_replicas(url):
    assert health(url)["replicas"]["running"] == 2
    model = client(url).models.list().data[0].id
    results: dict[int, tuple[str, str, str | None]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(16)
    questions = list(QUESTIONS) * 2

    def run(i: int):
        try:
            c = client(url)
            start.wait()
            raw = c.chat.completions.with_raw_response.create(
                model=model,
                messages=[{"role": "user", "content": questions[i]}],
                max_tokens=16,
                temperature=0,
                stream=True,
            )
            chunks = list(raw.parse())
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            results[i] = (text, raw.headers[REPLICA_HEADER], finish[-1] if finish else None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert len(results) == 16
    for i, (text, _, finish) in results.items():
        assert answer_found(text, [QUESTIONS[questions[i]]]), (questions[i], text)
        assert finish in ("stop", "length")
    served = {replica for _, replica, _ in results.values()}
    assert len(served) == 2, f"all 16 requests went to {served}"

    # the replicas' metrics count what they generated
    def metrics():
        text = httpx.get(url + "/metrics", timeout=30).text
        counts = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("gptq_bridge_generated_tokens_total{")
        ]
        return text if len(counts) == 2 and all(c > 0 for c in counts) else None

    text = wait_for(metrics, 15, "the replicas' generated tokens did not reach /metrics")
    assert 'gptq_bridge_time_to_first_token_seconds_count{replica="' in text
    assert "gptq_bridge_replicas 2" in text
    report = health(url)
    assert report["status"] == "ok" and len(report["replica_list"]) == 2
    assert {r["id"] for r in report["replica_list"]} == served


def test_a_client_that_disconnects_mid_stream_stops_its_generation(url):
    model = client(url).models.list().data[0].id
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}],
        "max_tokens": 1000,  # the default model counts on past 600 tokens: tens of seconds on a CPU
        "stream": True,
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        replica = r.headers[REPLICA_HEADER]
        words = 0
        for line in r.iter_lines():
            words += '"content": "' in line and '"content": ""' not in line
            if words >= 3:
                break

    def generated() -> int:
        text = httpx.get(url + "/metrics", timeout=30).text
        prefix = f'gptq_bridge_generated_tokens_total{{replica="{replica}"}} '
        return int(float(next(line for line in text.splitlines() if line.startswith(prefix))[len(prefix) :]))

    def idle():
        return all(r["running_requests"] == 0 for r in health(url)["replica_list"])

    time.sleep(3)  # the stats /health and /metrics show are up to a second old: let them catch up
    wait_for(idle, 10, "the replica still runs the request of a client that went away")
    before = generated()
    time.sleep(2.5)  # a running generation (1000 tokens, tens of seconds) would add tokens meanwhile
    assert generated() == before, "the replica went on generating for a client that went away"


def test_a_replica_killed_mid_stream_ends_its_streams_with_an_error_and_comes_back(url):
    before = {r["id"]: r["pid"] for r in health(url)["replica_list"]}
    model = client(url).models.list().data[0].id
    assert len(before) == 2
    started = threading.Barrier(5)
    outcome: dict[int, tuple[str, str, BaseException | None]] = {}

    def run(i: int):
        c = client(url)
        text, replica, error = "", "", None
        try:
            raw = c.chat.completions.with_raw_response.create(
                model=model, messages=LONG, max_tokens=100, temperature=0, stream=True
            )
            replica = raw.headers[REPLICA_HEADER]
            first = True
            for ch in raw.parse():
                if ch.choices and ch.choices[0].delta.content:
                    text += ch.choices[0].delta.content
                    if first:
                        first = False
                        started.wait(timeout=120)
        except BaseException as exc:  # noqa: BLE001 - checked below
            error = exc
        outcome[i] = (text, replica, error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait(timeout=120)  # every stream has its first words
    victim_id = sorted(before)[0]
    os.kill(before[victim_id], signal.SIGKILL)
    for t in threads:
        t.join(timeout=180)
    assert len(outcome) == 4
    on_victim = [o for o in outcome.values() if o[1] == victim_id]
    others = [o for o in outcome.values() if o[1] != victim_id]
    assert on_victim and others, f"the 4 streams were not spread over both replicas: {outcome}"
    for _, _, error in on_victim:
        assert isinstance(error, openai.APIError), error
        assert "stopped before the response was complete" in str(error.message)
    for text, _, error in others:
        assert error is None, error
        assert len(text) > 0

    # /health shows the loss until the replacement has loaded its model (seconds)
    wait_for(lambda: health(url)["status"] == "degraded", 30, "/health did not report the lost replica")

    # new requests go to the healthy replica while the other comes back
    c = client(url)
    got = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of Japan?"}], max_tokens=16
    )
    assert "Tokyo" in got.choices[0].message.content

    def back():
        report = health(url)
        pids = {r["pid"] for r in report["replica_list"]}
        return report["status"] == "ok" and len(pids) == 2 and before[victim_id] not in pids

    wait_for(back, 120, "the killed replica was not replaced")
    answers = [
        c.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], max_tokens=16, temperature=0)
        for q in list(QUESTIONS)[:4]
    ]
    for q, a in zip(list(QUESTIONS)[:4], answers):
        assert answer_found(a.choices[0].message.content, [QUESTIONS[q]])
    failures = [
        line
        for line in httpx.get(url + "/metrics", timeout=30).text.splitlines()
        if line.startswith("gptq_bridge_replica_failures_total")
    ]
    assert failures == [f"gptq_bridge_replica_failures_total {len(on_victim)}"]

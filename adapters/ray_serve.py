"""Replicas of the OpenAI-compatible server under Ray Serve: one endpoint in front of N copies of the model.

    gptq-bridge serve --model SOURCE --replicas 2                        # starts a local Ray instance
    gptq-bridge serve --model SOURCE --replicas 8 --ray-address auto     # joins a running Ray cluster
    serve run gptq_bridge.adapters.ray_serve:app model=SOURCE replicas=2  # Ray Serve's own CLI

The application has two deployments:

- `GPTQReplica`, N replicas. Each is one Ray actor process that loads the model (its own decode engine) and runs
  the same FastAPI app as `gptq-bridge serve` (`openai_server.create_app`) inside itself. A request reaches it as a
  dict (method, path, headers, body); the app's response goes back as a Ray Serve stream: the status and headers
  first, then the body bytes exactly as the app writes them, so server-sent events pass through unchanged.
- `OpenAIIngress`, one replica and no CPU reserved: the HTTP routes. `/v1/...` goes to a model replica chosen by
  `FewestQueuedTokensRouter`; `/health` reports the replicas; `/metrics` is Prometheus text of each replica's
  generated tokens, tokens/s, running requests, queued tokens and time to first token.

Routing is Ray Serve's own request router (`RequestRouterConfig`) with a request router of ours: the replicas are
ranked by their queued tokens, fewest first, and Ray Serve sends the request to the first one that accepts it (a
replica at `max_ongoing_requests` rejects; Ray Serve's queue-length cache and probes decide that, and break ties).
A request's tokens are estimated at the ingress as what the engine reserves for it: the prompt (UTF-8 bytes / 4)
plus max_tokens. A replica's queued tokens are the larger of what this router has sent it and not yet seen end,
and what the replica itself reports through Ray Serve's routing stats (every second), which also counts the
requests other routers sent it.

Faults: a replica that dies mid-stream ends its streams with an error event (`data: {"error": ...}`, which the
`openai` client raises as an APIError) and non-streamed requests with a 503 error object; other replicas' streams
go on. Ray Serve's controller starts a replacement, and the router stops sending to the dead one.

Needs the `ray` extra (`pip install "gptq-bridge[ray]"`).
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (`Request`) as objects
import asyncio
import importlib
import json
import math
import os
import random
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Any

from ..errors import GPTQBridgeError

try:
    import ray
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from ray import serve
    from ray.serve.config import RequestRouterConfig
    from ray.serve.exceptions import BackPressureError
    from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
except ImportError as exc:  # pragma: no cover - the message is the point
    raise GPTQBridgeError(f'serving replicas needs the ray extra: pip install "gptq-bridge[ray]" ({exc})') from None

MODULE = "gptq_bridge.adapters.ray_serve"
APP_NAME = "gptq-bridge"
REPLICA_HEADER = "x-gptq-bridge-replica"
DEFAULT_NEW_TOKENS = 256  # the server's max_tokens when a request names none (less where the context is shorter)
BYTES_PER_TOKEN = 4
STATS_PERIOD_S = 1.0  # how often Ray Serve collects each replica's routing stats
TENTATIVE_S = 5.0  # a choice not yet confirmed by Ray Serve counts against its replica this long
RATE_WINDOW_S = 10.0  # tokens/s is measured over this window
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


# --- settings --------------------------------------------------------------------------------------------------


@dataclass
class ReplicaSettings:
    """What every replica loads and how it serves; the keys of `serve run ...:app key=value`."""

    model: str | None = None  # a directory or hub id; None = the embedded default model
    replicas: int = 2
    kernel: str = "auto"
    device: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    engine: str = "auto"
    kv_cache: str | None = None
    prompt_format: str | None = None
    served_model_name: str | None = None
    api_key: str | None = None
    max_queue: int = 64  # requests each replica runs at once (Ray Serve's max_ongoing_requests)
    timeout: float | None = None
    replica_cpus: float | None = None  # CPUs Ray reserves per replica; None: see cpus()
    replica_gpus: float | None = None  # GPUs per replica; None: 1 on a CUDA device, else 0

    def __post_init__(self):
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) or self.replicas < 1:
            raise GPTQBridgeError(f"replicas: expected a whole number of at least 1, got {self.replicas!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise GPTQBridgeError(f"max_queue: expected a whole number of at least 1, got {self.max_queue!r}")
        for name in ("replica_cpus", "replica_gpus"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise GPTQBridgeError(f"{name}: expected a number of at least 0, got {value!r}")

    @classmethod
    def from_args(cls, args: dict) -> "ReplicaSettings":
        """Settings from `key=value` strings (Ray Serve's application arguments); errors name the key."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in args.items():
            if key not in known:
                raise GPTQBridgeError(f"{key}: not a setting of gptq-bridge's Ray Serve app; known: {', '.join(known)}")
            kind = next((t for t in getattr(known[key].type, "__args__", ()) if t is not type(None)), known[key].type)
            try:
                if not isinstance(raw, str) or kind is str:
                    values[key] = raw
                elif kind is bool:
                    if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(raw)
                    values[key] = raw.lower() in ("true", "1", "yes")
                else:
                    values[key] = kind(raw)
            except ValueError:
                raise GPTQBridgeError(f"{key}: {raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)

    def gpus(self) -> float:
        if self.replica_gpus is not None:
            return float(self.replica_gpus)
        if self.device is not None:
            return 0.0 if self.device == "cpu" else 1.0
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0

    def cpus(self) -> float:
        """CPUs per replica: as set, else 1 beside a GPU, else this machine's CPUs shared among the replicas."""
        if self.replica_cpus is not None:
            return float(self.replica_cpus)
        if self.gpus() > 0:
            return 1.0
        return float(max(1, (os.cpu_count() or 1) // self.replicas))


# --- a replica: the model and the OpenAI app ----------------------------------------------------------------------


class ReplicaStats:
    """One replica's counters, updated by its generation threads and read by Ray Serve's routing-stats poll."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0  # HTTP requests in progress
        self.reserved_tokens = 0  # their estimated tokens (prompt + max_tokens)
        self.streams = 0  # generations in progress
        self.streamed_tokens = 0  # tokens those generations have produced so far
        self.generated_tokens = 0
        self.finished_requests = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self._recent: deque = deque()  # (time, tokens)

    def request_started(self, tokens: int) -> None:
        with self._lock:
            self.requests += 1
            self.reserved_tokens += tokens

    def request_ended(self, tokens: int) -> None:
        with self._lock:
            self.requests -= 1
            self.reserved_tokens -= tokens
            self.finished_requests += 1

    def stream_started(self) -> None:
        with self._lock:
            self.streams += 1

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self.streamed_tokens += n
            self.generated_tokens += n
            self._recent.append((time.monotonic(), n))

    def first_token(self, seconds: float) -> None:
        with self._lock:
            i = next((i for i, edge in enumerate(TTFT_BUCKETS) if seconds <= edge), len(TTFT_BUCKETS))
            self.ttft_counts[i] += 1
            self.ttft_sum += seconds

    def stream_ended(self, streamed: int) -> None:
        with self._lock:
            self.streams -= 1
            self.streamed_tokens -= streamed

    def snapshot(self) -> dict:
        with self._lock:
            now = time.monotonic()
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return {
                "running_requests": self.requests,
                "queued_tokens": max(0, self.reserved_tokens - self.streamed_tokens),
                "generated_tokens": self.generated_tokens,
                "finished_requests": self.finished_requests,
                "tokens_per_s": sum(n for _, n in self._recent) / RATE_WINDOW_S,
                "ttft_counts": list(self.ttft_counts),
                "ttft_sum": self.ttft_sum,
            }


class _MeasuredStream:
    """A GenerationStream whose tokens and time to first token go to the replica's stats."""

    def __init__(self, stream, stats: ReplicaStats, started: float):
        self._stream, self._stats, self._started = stream, stats, started

    def __iter__(self):
        counted, first = 0, True
        self._stats.stream_started()
        try:
            for chunk in self._stream:
                n = len(chunk.token_ids)
                if first and (n or chunk.text):
                    self._stats.first_token(time.perf_counter() - self._started)
                    first = False
                self._stats.tokens(n)
                counted += n
                yield chunk
            result = self._stream.result
            if result is not None:  # tokens held back (stop strings) and never shown are still generated
                self._stats.tokens(result.usage.completion_tokens - counted)
                counted = max(counted, result.usage.completion_tokens)
        finally:
            self._stats.stream_ended(counted)

    def __getattr__(self, name):  # result, text, cancel, close
        return getattr(self._stream, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream.close()


class _MeasuredModel:
    """The loaded model as the OpenAI app sees it: the same, with every stream measured."""

    def __init__(self, lm, stats: ReplicaStats):
        self._lm, self._stats = lm, stats

    def stream(self, *args, **kwargs):
        started = time.perf_counter()
        return _MeasuredStream(self._lm.stream(*args, **kwargs), self._stats, started)

    def __getattr__(self, name):
        return getattr(self._lm, name)


def _open_model(settings: ReplicaSettings):
    """The model as `gptq-bridge serve` opens it (same loader arguments, same prompt-format choice)."""
    from types import SimpleNamespace

    from ..commands import open_model

    device = settings.device
    if device is not None and device.startswith("cuda:"):
        device = "cuda"  # Ray shows a replica only the GPUs it reserved for it, numbered from 0
    args = SimpleNamespace(
        model=settings.model,
        kernel=settings.kernel,
        device=device,
        revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
        allow_pickle=settings.allow_pickle,
        engine=settings.engine,
        kv_cache=settings.kv_cache,
        prompt_format=settings.prompt_format,
        quiet=False,
    )
    return open_model(args)


async def _run_asgi(app, request: dict):
    """Run one request through an ASGI app in this process; yield ("start", status, headers), then body bytes."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request["method"],
        "scheme": "http",
        "path": request["path"],
        "raw_path": request["path"].encode(),
        "query_string": request.get("query_string", b""),
        "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request["headers"]],
        "client": tuple(request["client"]) if request.get("client") else None,
        "server": None,
    }
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await disconnected.wait()  # the consumer went away (or the response is complete)
        return {"type": "http.disconnect"}

    async def send(message):
        messages.put_nowait(message)

    end = object()
    task = asyncio.get_running_loop().create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(end))
    complete = False
    try:
        while True:
            message = await messages.get()
            if message is end:
                task.result()  # the app's own exception, if it raised one
                raise RuntimeError("the app ended without completing its response")
            if message["type"] == "http.response.start":
                yield (
                    "start",
                    message["status"],
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])],
                )
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    complete = True
                    return
    finally:
        disconnected.set()
        if complete:
            try:  # let the app finish its own clean-up (it has sent everything)
                await asyncio.wait_for(asyncio.shield(task), 10)
            except BaseException:  # noqa: BLE001 - the response is already complete
                pass
        elif not task.done():
            task.cancel()


class GPTQReplica:
    """One copy of the model with the OpenAI app around it (the class of the `GPTQReplica` deployment)."""

    def __init__(self, settings: ReplicaSettings):
        import torch

        from .common import model_display_name
        from .openai_server import ServerOptions, create_app

        if settings.gpus() == 0:
            torch.set_num_threads(max(1, int(settings.cpus())))  # the CPUs Ray reserved for this replica
        lm = _open_model(settings)
        self.stats = ReplicaStats()
        self.model_name = settings.served_model_name or model_display_name(lm)
        options = ServerOptions(
            model_name=self.model_name,
            api_key=settings.api_key,
            max_queue=settings.max_queue,
            timeout_s=settings.timeout,
        )
        self.app = create_app(_MeasuredModel(lm, self.stats), options)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.pid = os.getpid()

    async def handle(self, request: dict):
        """The app's response to `request`: ("start", status, headers) with this replica's id, then body bytes."""
        tokens = int(request.get("tokens", 0))
        self.stats.request_started(tokens)
        response = _run_asgi(self.app, request)
        try:
            async for item in response:
                if isinstance(item, tuple):
                    _, status, headers = item
                    yield {"status": status, "headers": headers, "replica": self.replica_id, "pid": self.pid}
                else:
                    yield item
        finally:
            await response.aclose()  # on a consumer that went away, cancels the generation
            self.stats.request_ended(tokens)

    def record_routing_stats(self) -> dict:
        """Polled by Ray Serve every STATS_PERIOD_S; handed to every router of this deployment."""
        return {**self.stats.snapshot(), "pid": self.pid, "model": self.model_name, "replica": self.replica_id}


# --- routing -----------------------------------------------------------------------------------------------------

_ROUTERS: dict[str, "FewestQueuedTokensRouter"] = {}  # per process: the ingress reads its router's view of replicas


def _routers() -> dict[str, "FewestQueuedTokensRouter"]:
    """This process's routers by deployment ("app/deployment"), made by the deployment handles.

    Looked up through the imported module at run time: Ray ships the router and ingress classes by value, and a
    by-value copy of a function carries a copy of the dicts it names."""
    return importlib.import_module(MODULE)._ROUTERS


def _request_tokens(pending: PendingRequest | None) -> int:
    if pending is not None and pending.args and isinstance(pending.args[0], dict):
        return int(pending.args[0].get("tokens", 1))
    return 1


class FewestQueuedTokensRouter(RequestRouter):
    """Rank the replicas by queued tokens, fewest first; Ray Serve sends to the first that accepts.

    Queued tokens of a replica: the larger of (a) the tokens of the requests this router sent it that have not
    ended, and of its own choices that Ray Serve has not yet confirmed (for TENTATIVE_S, so a burst of requests
    spreads out before the first is confirmed), and (b) the replica's own count from its routing stats. Ties go
    to the shorter queue in Ray Serve's queue-length cache, then at random.
    """

    def initialize_state(self, **kwargs):
        self._lock = threading.Lock()
        self._sent: dict[str, tuple[ReplicaID, int]] = {}  # internal request id -> (replica, tokens)
        self._chosen: dict[str, tuple[ReplicaID, int, float]] = {}  # not yet confirmed: + when chosen
        _routers()[f"{self._deployment_id.app_name}/{self._deployment_id.name}"] = self

    def queued_tokens(self) -> dict[ReplicaID, int]:
        now = time.monotonic()
        load: dict[ReplicaID, int] = {}
        with self._lock:
            for rid, (replica, tokens, when) in list(self._chosen.items()):
                if now - when > TENTATIVE_S:
                    del self._chosen[rid]
                else:
                    load[replica] = load.get(replica, 0) + tokens
            for replica, tokens in self._sent.values():
                load[replica] = load.get(replica, 0) + tokens
        return load

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all rejected: back off before trying again
        local = self.queued_tokens()
        cache = self.replica_queue_len_cache

        def key(r: RunningReplica):
            reported = (r.routing_stats or {}).get("queued_tokens", 0)
            return (max(local.get(r.replica_id, 0), reported), cache.get(r.replica_id) or 0, random.random())

        ranked = sorted(candidate_replicas, key=key)
        if pending_request is not None:
            with self._lock:
                self._chosen[pending_request.metadata.internal_request_id] = (
                    ranked[0].replica_id,
                    _request_tokens(pending_request),
                    time.monotonic(),
                )
        return [[r] for r in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        rid = pending_request.metadata.internal_request_id
        with self._lock:
            self._chosen.pop(rid, None)
            self._sent[rid] = (replica_id, _request_tokens(pending_request))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        with self._lock:
            self._sent.pop(internal_request_id, None)
            self._chosen.pop(internal_request_id, None)

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        with self._lock:
            for table in (self._sent, self._chosen):
                for rid in [rid for rid, entry in table.items() if entry[0] == replica_id]:
                    del table[rid]

    def replica_view(self) -> list[dict]:
        """Each replica this router can send to, with its latest routing stats."""
        load = self.queued_tokens()
        out = []
        for replica_id, replica in sorted(dict(self.curr_replicas).items(), key=lambda kv: kv[0].unique_id):
            stats = dict(replica.routing_stats or {})
            stats["queued_tokens"] = max(stats.get("queued_tokens", 0), load.get(replica_id, 0))
            out.append({"id": replica_id.unique_id, "node_id": replica.node_id, **stats})
        return out


# --- the ingress ---------------------------------------------------------------------------------------------------


def estimate_tokens(body: bytes) -> int:
    """What a request will hold in its replica's KV cache: its prompt (UTF-8 bytes / 4, a usual rate for English
    with a BPE vocabulary) plus its max_tokens (DEFAULT_NEW_TOKENS when it names none)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return 1
    if not isinstance(data, dict):
        return 1
    texts: list[str] = []
    if isinstance(data.get("prompt"), str):
        texts.append(data["prompt"])
    for message in data.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    new = data.get("max_completion_tokens", data.get("max_tokens"))
    if not isinstance(new, int) or isinstance(new, bool) or new < 1:
        new = DEFAULT_NEW_TOKENS
    return math.ceil(sum(len(t.encode()) for t in texts) / BYTES_PER_TOKEN) + new


def _error(status: int, message: str, code: str, type_: str = "server_error", headers: dict | None = None):
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _failure(exc: BaseException, replica: str | None) -> str:
    where = f"the replica serving this request ({replica})" if replica else "the replica chosen for this request"
    if isinstance(exc, ray.exceptions.RayActorError):
        return f"{where} stopped before the response was complete; Ray Serve is replacing it, retry the request"
    first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return f"{where} failed: {first}"


def _prometheus(replicas: list[dict], running: int, target: int, failures: int) -> str:
    lines: list[str] = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{label}}} {value}" if label else f"{name} {value}")

    def per(key):
        return [({"replica": r["id"]}, r.get(key, 0)) for r in replicas]

    metric("gptq_bridge_replicas", "gauge", "Model replicas running.", [({}, running)])
    metric("gptq_bridge_replicas_target", "gauge", "Model replicas asked for.", [({}, target)])
    metric(
        "gptq_bridge_replica_failures_total",
        "counter",
        "Requests ended with an error because their replica failed.",
        [({}, failures)],
    )
    metric("gptq_bridge_generated_tokens_total", "counter", "Tokens generated.", per("generated_tokens"))
    metric("gptq_bridge_finished_requests_total", "counter", "Requests finished.", per("finished_requests"))
    metric(
        "gptq_bridge_tokens_per_second",
        "gauge",
        f"Tokens generated per second over {RATE_WINDOW_S:g} s.",
        per("tokens_per_s"),
    )
    metric("gptq_bridge_running_requests", "gauge", "Requests in progress (the queue length).", per("running_requests"))
    metric(
        "gptq_bridge_queued_tokens",
        "gauge",
        "Prompt and new tokens still to come of requests in progress.",
        per("queued_tokens"),
    )
    name = "gptq_bridge_time_to_first_token_seconds"
    lines.append(f"# HELP {name} From the start of a generation to its first token.")
    lines.append(f"# TYPE {name} histogram")
    for r in replicas:
        counts = r.get("ttft_counts") or [0] * (len(TTFT_BUCKETS) + 1)
        total = 0
        for edge, count in zip((*TTFT_BUCKETS, "+Inf"), counts):
            total += count
            lines.append(f'{name}_bucket{{replica="{r["id"]}",le="{edge}"}} {total}')
        lines.append(f'{name}_sum{{replica="{r["id"]}"}} {r.get("ttft_sum", 0.0)}')
        lines.append(f'{name}_count{{replica="{r["id"]}"}} {total}')
    return "\n".join(lines) + "\n"


api = FastAPI(title="gptq-bridge replicas", docs_url=None, redoc_url=None, openapi_url=None)


@serve.ingress(api)
class OpenAIIngress:
    """The HTTP routes: /health, /metrics, and everything else passed to a model replica."""

    async def __init__(self, model, settings: ReplicaSettings):  # Ray Serve awaits an async constructor
        self.model = model
        self.settings = settings
        self.failures = 0
        self._router_key = f"{model.app_name}/{model.deployment_name}"
        # one request through the handle makes its router (the replicas' view behind /health and /metrics)
        self._warm = asyncio.get_running_loop().create_task(self._make_router())

    async def _make_router(self):
        while _routers().get(self._router_key) is None:
            try:
                await self.model.record_routing_stats.remote()
            except Exception:  # noqa: BLE001 - retried until the replicas are up
                pass
            await asyncio.sleep(0.5)

    async def _replicas(self) -> tuple[list[dict], dict]:
        router = _routers().get(self._router_key)
        view = router.replica_view() if router is not None else []
        try:
            status = await asyncio.to_thread(serve.status)
            deployment = status.applications[self.model.app_name].deployments[self.model.deployment_name]
            states = {str(k): v for k, v in deployment.replica_states.items()}
        except Exception:  # noqa: BLE001 - the controller is restarting: report what the router knows
            states = {"RUNNING": len(view)}
        return view, states

    @api.get("/health")
    async def health(self):
        view, states = await self._replicas()
        running = states.get("RUNNING", 0)
        target = self.settings.replicas
        status = "ok" if running >= target else ("degraded" if running else "unavailable")
        body = {
            "status": status,
            "model": next((r["model"] for r in view if r.get("model")), None),
            "replicas": {"target": target, "running": running, "states": states},
            "replica_list": [
                {k: r.get(k) for k in ("id", "node_id", "pid", "running_requests", "queued_tokens", "tokens_per_s")}
                for r in view
            ],
        }
        return JSONResponse(body, status_code=200 if running else 503)

    @api.get("/metrics")
    async def metrics(self):
        view, states = await self._replicas()
        text = _prometheus(view, states.get("RUNNING", 0), self.settings.replicas, self.failures)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    async def forward(self, request: Request, path: str):
        body = await request.body()
        payload = {
            "method": request.method,
            "path": request.url.path,
            "query_string": request.url.query.encode(),
            "headers": [(k, v) for k, v in request.headers.items()],
            "body": body,
            "client": [request.client.host, request.client.port] if request.client else None,
            "tokens": estimate_tokens(body) if request.method == "POST" else 1,
        }
        response = self.model.options(stream=True).handle.remote(payload)
        try:
            head = await response.__anext__()
        except BackPressureError:
            return _error(
                429,
                "every replica is busy and the queue is full; try again shortly",
                "rate_limit_exceeded",
                "rate_limit_error",
                {"Retry-After": "1"},
            )
        except Exception as exc:  # noqa: BLE001 - an answer, never a dropped connection
            self.failures += 1
            return _error(503, _failure(exc, None), "replica_failed", headers={"Retry-After": "1"})
        replica = head["replica"]
        headers = {k: v for k, v in head["headers"] if k.lower() not in ("content-length", "transfer-encoding")}
        headers[REPLICA_HEADER] = replica
        if not headers.get("content-type", "").startswith("text/event-stream"):
            chunks = []
            try:
                async for chunk in response:
                    chunks.append(chunk)
            except Exception as exc:  # noqa: BLE001
                self.failures += 1
                return _error(503, _failure(exc, replica), "replica_failed", headers={"Retry-After": "1"})
            return Response(b"".join(chunks), status_code=head["status"], headers=headers)

        async def events():
            try:
                async for chunk in response:
                    yield chunk
            except Exception as exc:  # noqa: BLE001 - the stream ends with an error event, as OpenAI's do
                self.failures += 1
                error = {
                    "error": {
                        "message": _failure(exc, replica),
                        "type": "server_error",
                        "param": None,
                        "code": "replica_failed",
                    }
                }
                yield f"\n\ndata: {json.dumps(error)}\n\n".encode()
            finally:
                response.cancel()

        return StreamingResponse(events(), status_code=head["status"], headers=headers)


# --- the application -------------------------------------------------------------------------------------------


def build_app(settings: ReplicaSettings):
    """The Ray Serve application: `settings.replicas` model replicas behind one OpenAI-compatible ingress."""
    replica = serve.deployment(
        GPTQReplica,
        name="GPTQReplica",
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.cpus(), "num_gpus": settings.gpus()},
        max_ongoing_requests=settings.max_queue,
        logging_config={"enable_access_log": False},  # Ray Serve polls record_routing_stats every second
        max_queued_requests=settings.max_queue * settings.replicas,
        request_router_config=RequestRouterConfig(
            request_router_class=FewestQueuedTokensRouter,
            request_routing_stats_period_s=STATS_PERIOD_S,
        ),
    )
    ingress = serve.deployment(
        OpenAIIngress,
        name="OpenAIIngress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=settings.max_queue * settings.replicas * 2,
    )
    return ingress.bind(replica.bind(settings), settings)


def app(args: dict):
    """The application builder for Ray Serve's CLI: `serve run gptq_bridge.adapters.ray_serve:app model=... replicas=2`."""
    return build_app(ReplicaSettings.from_args(args))


# --- the command -----------------------------------------------------------------------------------------------


def settings_from_cli(args) -> ReplicaSettings:
    return ReplicaSettings(
        model=args.model,
        replicas=args.replicas,
        kernel=args.kernel,
        device=args.device,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        engine=args.engine,
        kv_cache=args.kv_cache,
        prompt_format=args.prompt_format,
        served_model_name=args.served_model_name,
        api_key=args.api_key or os.environ.get("GPTQ_BRIDGE_API_KEY"),
        max_queue=args.max_queue,
        timeout=args.timeout,
    )


def check_resources(settings: ReplicaSettings) -> None:
    """Refuse up front what Ray could never place (it would wait for the resources forever)."""
    available = ray.cluster_resources()
    for resource, each in (("CPU", settings.cpus()), ("GPU", settings.gpus())):
        need = each * settings.replicas
        have = available.get(resource, 0)
        if need > have:
            raise GPTQBridgeError(
                f"--replicas {settings.replicas}: needs {need:g} {resource}s ({each:g} each), "
                f"the Ray cluster has {have:g}"
            )


def serve_command(args) -> int:
    """`gptq-bridge serve --replicas N [--ray-address ADDR]`: run the application until Ctrl-C or SIGTERM."""
    from ..commands import progress

    if args.replicas is None or args.replicas < 1:
        raise GPTQBridgeError(f"--replicas: expected a whole number of at least 1, got {args.replicas}")
    settings = settings_from_cli(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        progress(args, f"warning: serving on {args.host} without an API key (set --api-key or GPTQ_BRIDGE_API_KEY)")
    joined = args.ray_address is not None
    ray.init(address=args.ray_address, include_dashboard=False if not joined else None, log_to_driver=not args.quiet)
    stop = threading.Event()
    try:
        if not joined:  # a cluster may have an autoscaler that adds the nodes when asked
            check_resources(settings)
        serve.start(http_options={"host": args.host, "port": args.port})
        progress(args, f"starting {settings.replicas} replicas ...")
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        progress(args, f"serving {settings.replicas} replicas on http://{args.host}:{args.port}/v1")
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        progress(args, "stopping the replicas ...")
        if joined:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    return 0

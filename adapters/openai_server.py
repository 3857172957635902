"""`gptq-bridge serve`: an OpenAI-compatible HTTP server, so frontends that speak the OpenAI API use gptq-bridge.

    gptq-bridge serve --model TheBloke/Nous-Hermes-Llama2-70B-GPTQ --port 8000
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both with and without
`stream`, server-sent events ending in `data: [DONE]`). Each request is one generation of the loaded model; on
Llama-family models they share the decode engine's batch. Errors are OpenAI error objects with 4xx codes.
Needs the `server` extra (FastAPI and uvicorn).
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations (`Request`, imported inside
# create_app because FastAPI is an optional extra) as objects
import asyncio
import json
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import GPTQBridgeError
from ..hookspecs import hookimpl

MAX_BODY_BYTES = 1 << 20
UNSUPPORTED = {  # fields a frontend may send that this server does not implement, and why
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "logit_bias": "logit_bias is not supported",
    "response_format": "response_format is not supported",
    "echo": "echo is not supported",
    "suffix": "suffix is not supported",
    "best_of": "best_of is not supported",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = (
            status,
            message,
            param,
            code,
            type_,
            headers or {},
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- requests --------------------------------------------------------------------------------------------------


def _number(body: dict, name: str, kind: type, low: float | None = None, high: float | None = None):
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok or value != value:  # value != value: NaN, which JSON parsers accept
        raise APIError(400, f"{name}: expected {'a number' if kind is float else 'an integer'}, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(400, f"{name}: {value!r} is outside [{low}, {high}]", name)
    return kind(value)


def _text(content: Any, where: str) -> str:
    """Message content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"{where}: only text content parts are supported, got {kind!r}", where)
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"{where}: expected a string or a list of text parts", where)


def tools(body: dict) -> None:
    """Tools are offered, never called: under tool_choice "auto" (the default) or "none" a model may always
    answer in text, so frontends that send their tools with every request (Open WebUI does) work as they are.
    A request that demands a call (tool_choice "required" or a named function) is a 400."""
    for offer, choice in (("tools", "tool_choice"), ("functions", "function_call")):
        if body.get(offer) is not None and not isinstance(body[offer], list):
            raise APIError(400, f"{offer}: expected a list", offer)
        if body.get(choice) not in (None, "auto", "none"):
            raise APIError(400, f"{choice}: this server's models do not call tools; use 'auto' or 'none'", choice)


def generation_kwargs(body: dict, context: int | None) -> dict:
    """The sampling parameters of an OpenAI request as gptq-bridge keywords; errors name the field."""
    for name, why in UNSUPPORTED.items():
        if body.get(name) not in (None, False, [], 0) or (name == "logprobs" and body.get(name) not in (None, False)):
            raise APIError(400, f"{name}: {why} by this server", name)
    tools(body)
    n = _number(body, "n", int)
    if n not in (None, 1):
        raise APIError(400, f"n: only n = 1 is supported, got {n}", "n")
    kwargs: dict = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = _number({field: max_tokens}, field, int, 1, context)
        kwargs["max_new_tokens"] = max_tokens
    temperature = _number(body, "temperature", float, 0, 2)
    if temperature is not None:
        kwargs["temperature"] = temperature
    top_p = _number(body, "top_p", float, 0, 1)
    if top_p is not None:
        if top_p == 0:
            raise APIError(400, "top_p: must be more than 0", "top_p")
        kwargs["top_p"] = top_p
    for name in ("presence_penalty", "frequency_penalty"):
        value = _number(body, name, float, -2, 2)
        if value is not None:
            kwargs[name] = value
    seed = _number(body, "seed", int, 0, 2**63 - 1)
    if seed is not None:
        kwargs["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
            raise APIError(400, "stop: expected a non-empty string or a list of up to 4 of them", "stop")
        kwargs["stop"] = stops
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError(400, "user: expected a string", "user")
    return kwargs


CORE_NAMES = {  # gptq-bridge's parameter names in its errors, and the request fields they come from
    "max_new_tokens": ("max_completion_tokens", "max_tokens"),
    "temperature": ("temperature",),
    "top_p": ("top_p",),
    "seed": ("seed",),
    "stop": ("stop",),
    "presence_penalty": ("presence_penalty",),
    "frequency_penalty": ("frequency_penalty",),
    "prompt": ("messages", "prompt"),
    "messages": ("messages",),
    "kv_cache": ("max_completion_tokens", "max_tokens", "messages", "prompt"),
}


def core_error(exc: Exception, body: dict) -> APIError:
    """A gptq-bridge error about a request as a 400 whose `param` is the request field at fault."""
    message = str(exc)
    name = message.split(":", 1)[0].strip()
    field = next((f for f in CORE_NAMES.get(name, ()) if f in body), None)
    if field is not None and field != name and name != "kv_cache":
        message = f"{field}{message[len(name) :]}"
    return APIError(400, message, field)


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages: expected a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where}: expected an object with role and content", where)
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role: {role!r} is not one of system, user, assistant", f"{where}.role")
        out.append({"role": role, "content": _text(m.get("content"), f"{where}.content")})
    return out


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt: expected a string (one prompt per request)", "prompt")
    return prompt


# --- the app ---------------------------------------------------------------------------------------------------


@dataclass
class ServerOptions:
    model_name: str
    api_key: str | None = None
    max_queue: int = 64  # requests generating or waiting at once; more get 429
    max_body_bytes: int = MAX_BODY_BYTES
    timeout_s: float | None = None  # a generation running longer is cancelled (finish_reason "length")
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; none unless asked for


def finish_reason(reason: str) -> str:
    return "length" if reason in ("length", "cancelled") else "stop"


def create_app(lm, options: ServerOptions):
    """The FastAPI app serving `lm` (a LoadedModel)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="gptq-bridge", docs_url=None, redoc_url=None, openapi_url=None)
    if options.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(options.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    state = {"active": 0}
    lock = threading.Lock()
    context = None
    try:
        from ..generation import model_context_length

        context = model_context_length(lm)
    except Exception:  # noqa: BLE001 - a model without a known context takes any max_tokens the generator accepts
        context = None

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):  # a fault of the server, never of the request
        error = APIError(500, f"internal error: {type(exc).__name__}", type_="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # unknown routes and methods, as OpenAI error objects
        error = APIError(exc.status_code, str(exc.detail), type_="invalid_request_error")
        return JSONResponse(error.body(), status_code=exc.status_code)

    def authorize(request: Request) -> None:
        """Every /v1 route checks the API key when one is set, and the body's declared size."""
        if options.api_key is not None and request.headers.get("authorization", "") != f"Bearer {options.api_key}":
            raise APIError(
                401,
                "a valid API key is required (Authorization: Bearer KEY)",
                code="invalid_api_key",
                type_="authentication_error",
            )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > options.max_body_bytes:
            raise APIError(413, f"the request body is over {options.max_body_bytes} bytes")

    async def read_json(request: Request) -> dict:
        authorize(request)
        raw = await request.body()
        if len(raw) > options.max_body_bytes:
            raise APIError(413, f"the request body is over {options.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            raise APIError(400, "the body is not valid JSON: nested too deeply") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != options.model_name:
            raise APIError(
                404,
                f"model {model!r} is not served here; this server serves {options.model_name!r}",
                "model",
                "model_not_found",
            )
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "stream: expected true or false", "stream")
        return body

    def admit():
        with lock:
            if state["active"] >= options.max_queue:
                raise APIError(
                    429,
                    f"{options.max_queue} requests are in progress; try again shortly",
                    code="rate_limit_exceeded",
                    type_="rate_limit_error",
                    headers={"Retry-After": "1"},
                )
            state["active"] += 1

    def release():
        with lock:
            state["active"] -= 1

    def start(body, prompt, kwargs):
        """A GenerationStream for the request; bad parameters are a 400 naming them."""
        cancel = threading.Event()
        try:
            stream = lm.stream(prompt, cancel=cancel, **kwargs)
        except GPTQBridgeError as exc:
            raise core_error(exc, body) from None
        if options.timeout_s:
            timer = threading.Timer(options.timeout_s, cancel.set)
            timer.daemon = True
            timer.start()
        return stream

    async def batches_of(stream):
        """The stream's chunks, produced in a thread of its own, in lists of those that arrived since the consumer
        last looked: the event loop wakes once per list, not once per token (with many streams, per-token
        wake-ups would take the host time the engine needs). Cancels the generation if the consumer stops."""
        loop = asyncio.get_running_loop()
        arrived: list = []
        guard = threading.Lock()
        ready = asyncio.Event()
        end = object()

        def put(item):
            with guard:
                arrived.append(item)
                first = len(arrived) == 1
            if first:  # the consumer takes everything at once: only the first item since then wakes it
                loop.call_soon_threadsafe(ready.set)

        def pump():
            try:
                for chunk in stream:
                    put(chunk)
                put(end)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                put(exc)

        worker = threading.Thread(target=pump, name="gptq-bridge-request", daemon=True)
        worker.start()
        try:
            while True:
                await ready.wait()
                ready.clear()
                with guard:
                    items = arrived[:]
                    arrived.clear()
                chunks = []
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if item is end:
                        if chunks:
                            yield chunks
                        return
                    chunks.append(item)
                if chunks:
                    yield chunks
        finally:
            stream.cancel()

    def usage_of(result) -> dict:
        u = result.usage
        return {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
        }

    async def respond(request: Request, body: dict, prompt, chat: bool):
        kwargs = generation_kwargs(body, context)
        include_usage = (
            bool((body.get("stream_options") or {}).get("include_usage"))
            if isinstance(body.get("stream_options"), dict)
            else False
        )
        admit()
        try:
            stream = start(body, prompt, kwargs)
        except BaseException:
            release()
            raise
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        async def watch_disconnect():
            """Cancel the generation as soon as the client goes, even while no token is due (servers that
            report a disconnect only when a send fails would otherwise notice it one token late)."""
            while (await request.receive())["type"] != "http.disconnect":
                pass
            stream.cancel()

        if not body.get("stream"):
            watcher = asyncio.ensure_future(watch_disconnect())
            try:
                async for _ in batches_of(stream):
                    pass
            finally:
                watcher.cancel()
                release()
            result = stream.result
            choice = {"index": 0, "finish_reason": finish_reason(result.finish_reason)}
            if chat:
                choice["message"] = {"role": "assistant", "content": result.text}
            else:
                choice["text"], choice["logprobs"] = result.text, None
            return JSONResponse(
                {
                    "id": rid,
                    "object": kind,
                    "created": created,
                    "model": options.model_name,
                    "choices": [choice],
                    "usage": usage_of(result),
                }
            )

        def event(choice: dict | None, usage: dict | None = None) -> str:
            payload = {
                "id": rid,
                "object": f"{kind}.chunk" if chat else kind,
                "created": created,
                "model": options.model_name,
                "choices": [choice] if choice is not None else [],
            }
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        def piece(text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        async def events():
            watcher = asyncio.ensure_future(watch_disconnect())
            try:
                if chat:
                    yield event(piece(None, None, first=True))
                try:
                    async for chunks in batches_of(stream):  # one write for all the tokens that are ready
                        yield "".join(event(piece(chunk.text, None)) for chunk in chunks)
                except Exception as exc:  # noqa: BLE001 - the headers are sent: the error goes in the stream
                    error = APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type_="server_error")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
                result = stream.result
                yield event(piece(None, finish_reason(result.finish_reason)))
                if include_usage:
                    yield event(None, usage_of(result))
                yield "data: [DONE]\n\n"
            finally:
                watcher.cancel()
                release()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": options.model_name, "active_requests": state["active"]}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {
            "object": "list",
            "data": [{"id": options.model_name, "object": "model", "created": 0, "owned_by": "gptq-bridge"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        return await respond(request, body, chat_messages(body), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        return await respond(request, body, completion_prompt(body), chat=False)

    return app


# --- the command -----------------------------------------------------------------------------------------------


def _cmd_serve(args) -> int:
    if args.replicas is not None or args.ray_address is not None:  # N replicas under Ray Serve, one endpoint
        from .ray_serve import serve_command

        return serve_command(args)
    try:
        import uvicorn
    except ImportError:
        raise GPTQBridgeError('serve needs the server extra: pip install "gptq-bridge[server]"') from None
    from ..commands import open_model, progress
    from .common import model_display_name

    api_key = args.api_key or os.environ.get("GPTQ_BRIDGE_API_KEY")
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        progress(
            args,
            f"warning: serving on {args.host} without an API key: anyone who can reach it can use it "
            "(set --api-key or GPTQ_BRIDGE_API_KEY)",
        )
    lm = open_model(args)
    options = ServerOptions(
        model_name=args.served_model_name or model_display_name(lm),
        api_key=api_key,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        cors_origins=tuple(args.cors_origin or ()),
    )
    app = create_app(lm, options)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:
                progress(args, "stopping: requests in flight finish first (Ctrl-C again to stop now)")
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout
    )
    # uvicorn stops listening at the first Ctrl-C or SIGTERM, lets the streams in flight end, then raises the
    # signal again under the handler it found: these handlers make that a normal end (exit status 0)
    stopped = []
    previous = {sig: signal.signal(sig, lambda s, f: stopped.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        progress(args, f"serving {options.model_name} on http://{args.host}:{args.port}/v1")
        Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    progress(args, "stopped")
    return 0


@hookimpl
def gptq_register_commands(subparsers):
    from ..commands import add_engine_arguments
    from ..explain import add_source_arguments

    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("--model", "-m", default=None, metavar="SOURCE", help="model directory or hub id org/name[:branch]")
    add_source_arguments(p)
    add_engine_arguments(p)
    p.add_argument("--prompt-format", default=None, metavar="NAME", help="prompt format for chat messages")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (or GPTQ_BRIDGE_API_KEY)")
    p.add_argument("--max-queue", type=int, default=64, help="requests at once; more get 429 (default 64)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="cancel a generation after this")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="at Ctrl-C or SIGTERM, wait at most this long for requests in flight (default: until they end)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. http://localhost:3000, or *) call the API; repeatable (default: none)",
    )
    p.add_argument("--served-model-name", default=None, help="the model id clients see (default: from the source)")
    p.add_argument("--replicas", type=int, default=None, metavar="N", help="N copies under Ray Serve (extra ray)")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="with --replicas: join this Ray cluster")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_cmd_serve)

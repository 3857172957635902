"""What HTTP costs: `gptq-bridge serve` against the decode engine called directly, in one run.

    python bench/serve.py --device cpu --out bench/results/serve-cpu.json              # the default model
    python bench/serve.py --shape 7b --device cuda --out bench/results/serve-h100.json # a random 7B checkpoint
    python bench/serve.py --url http://127.0.0.1:8000/v1 [--served-model NAME]         # any OpenAI endpoint

For 1, 8 and 32 concurrent clients (--clients), each asking for --new greedy tokens of its own prompt, it
measures time to the first token (median and worst over the clients) and aggregate tokens/s (all completion
tokens over the wall time from the first request to the last token):
- `engine`: `lm.stream` called from one thread per client, in this process;
- `http`: `gptq-bridge serve` (started here as a subprocess, on the same model and device) streamed over
  server-sent events by asyncio clients in this process, requests and usage as any OpenAI client sends them.
The two take turns (--repeat runs each, the fastest kept), so a drift in the machine's load weighs on both.
`http_overhead_pct` is how much more time the same tokens take through HTTP: engine tok/s / HTTP tok/s - 1.
`cpu_ms_per_token` is the CPU time spent per token: by this process for the engine (the model and its callers),
by this process and the server's for HTTP (when the server is ours), so the difference is what HTTP costs the host
even where a loaded machine blurs the wall times.
With --url it measures the endpoint given instead of starting a server (and the engine only when --model or
--shape names what to load); OPENAI_API_KEY, if set, is sent as its key. Both sides send the same prompts and parameters, so greedy answers have the same
lengths. --shape writes a random-weight GPTQ checkpoint with bench/decode.py's writer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # bench/kernels.py shadows `kernels`
sys.path.append(str(HERE.parent))  # `from bench import decode`: its checkpoint writer and prompts

import httpx  # noqa: E402
import torch  # noqa: E402


def prompts(count: int, style: str, vocab: int | None) -> list[str]:
    """Prompts of one length whose greedy continuations run long: counting for a real model (it goes on
    counting), random words for a random-weight checkpoint."""
    if style == "words":
        from bench import decode

        return [decode.prompt(64, vocab, 1000 + i) for i in range(count)]
    return [", ".join(str(n) for n in range(10 * i + 1, 10 * i + 11)) + "," for i in range(count)]


def summary(ttft: list[float], tokens: int, wall: float) -> dict:
    return {
        "aggregate_tok_s": round(tokens / wall, 2),
        "ttft_median_ms": round(1000 * statistics.median(ttft), 1),
        "ttft_max_ms": round(1000 * max(ttft), 1),
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
    }


def process_cpu_s(pid: int | None = None) -> float:
    """CPU time (user + system) a process has used: this one, or another by pid (Linux)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(run, pids: list[int | None]) -> dict:
    """`run()`'s summary, with the CPU time the processes in `pids` spent per completion token: a cost that a
    busy machine disturbs far less than the wall time (None: this process)."""
    before = [process_cpu_s(p) for p in pids]
    result = run()
    spent = [process_cpu_s(p) - b for p, b in zip(pids, before)]
    result["cpu_ms_per_token"] = round(1000 * sum(spent) / result["completion_tokens"], 3)
    if len(pids) > 1:  # the server's share
        result["server_cpu_ms_per_token"] = round(1000 * sum(spent[1:]) / result["completion_tokens"], 3)
    return result


# --- the engine, directly --------------------------------------------------------------------------------------


def engine_run(lm, texts: list[str], new: int) -> dict:
    ttft = [0.0] * len(texts)
    counts = [0] * len(texts)
    go = threading.Barrier(len(texts) + 1)

    def client(i):
        go.wait()
        start = time.perf_counter()
        for chunk in lm.stream(texts[i], max_new_tokens=new, temperature=0.0):
            if counts[i] == 0 and chunk.token_ids:
                ttft[i] = time.perf_counter() - start
            counts[i] += len(chunk.token_ids)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return summary(ttft, sum(counts), time.perf_counter() - t0)


# --- over HTTP --------------------------------------------------------------------------------------------------


async def http_client(client: httpx.AsyncClient, url: str, model: str, text: str, new: int) -> tuple[float, int]:
    body = {
        "model": model,
        "prompt": text,
        "max_tokens": new,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, tokens = None, None
    async with client.stream("POST", url + "/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if ttft is None and event.get("choices") and event["choices"][0].get("text"):
                ttft = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if tokens is None:
        raise RuntimeError(f"{url}: the stream ended without usage (stream_options.include_usage)")
    return ttft if ttft is not None else time.perf_counter() - start, tokens


async def http_run_async(url: str, model: str, texts: list[str], new: int) -> dict:
    limits = httpx.Limits(max_connections=len(texts) + 4, max_keepalive_connections=len(texts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=auth_headers()) as client:
        await http_client(client, url, model, texts[0], 4)  # warm: a connection and the server's first request
        t0 = time.perf_counter()
        results = await asyncio.gather(*(http_client(client, url, model, t, new) for t in texts))
        wall = time.perf_counter() - t0
    return summary([r[0] for r in results], sum(r[1] for r in results), wall)


def http_run(url: str, model: str, texts: list[str], new: int) -> dict:
    return asyncio.run(http_run_async(url, model, texts, new))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(source: str, device: str | None, max_queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "gptq_bridge.cli", "serve", "--model", source, "--port", str(port), "--quiet"]
    cmd += ["--max-queue", str(max_queue)] + (["--device", device] if device else [])
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start in 900 s")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url + "/v1"
        except httpx.TransportError:
            time.sleep(0.3)


def auth_headers() -> dict:
    """The endpoint's key, if it needs one: OPENAI_API_KEY, as the openai client reads it."""
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def served_model(url: str) -> str:
    return httpx.get(url + "/models", headers=auth_headers(), timeout=30).json()["data"][0]["id"]


def device_name(device: str | None) -> str:
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return torch.cuda.get_device_name(0)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model source (default: the embedded default model)")
    ap.add_argument("--shape", default=None, help="a random checkpoint of bench/decode.py's shapes (7b, 13b, tiny)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    ap.add_argument("--url", default=None, help="measure this OpenAI-compatible endpoint (…/v1) instead of serving")
    ap.add_argument("--served-model", default=None, help="the model id at --url (default: its first model)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--new", type=int, default=64, help="completion tokens per client")
    ap.add_argument("--repeat", type=int, default=1, help="runs per point; the fastest is kept")
    ap.add_argument("--prompts", choices=("counting", "words"), default=None, help="default: words for --shape")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    clients = [int(x) for x in args.clients.split(",") if x]
    report: dict = {
        "device": device_name(args.device),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "bench/serve.py"] + sys.argv[1:]),
        "torch": torch.__version__,
        "new_tokens": args.new,
        "results": {},
    }

    source, vocab = args.model, None
    if args.shape:
        from bench import decode

        vocab = decode.SHAPES[args.shape][5]
        t = time.perf_counter()
        source = str(decode.random_checkpoint(args.shape, Path(tempfile.mkdtemp(prefix="gptq-bridge-serve-")) / "m"))
        report["checkpoint_s"] = round(time.perf_counter() - t, 1)
    if source is None and args.url is None:
        from gptq_bridge.default_model import default_source

        source = default_source()
    report["model"] = args.shape or (Path(source).name if source else args.url)  # a name, not this machine's path
    texts = prompts(max(clients), args.prompts or ("words" if args.shape else "counting"), vocab)

    lm, proc = None, None
    try:
        if args.url:
            url, model = args.url.rstrip("/"), args.served_model or served_model(args.url.rstrip("/"))
        else:  # the server first: on a GPU it sizes its KV cache from the memory free before this process loads
            proc, url = start_server(source, args.device, max(64, max(clients)))
            model = served_model(url)
        report["url"], report["served_model"] = url, model
        if source is not None:
            import gptq_bridge

            lm = gptq_bridge.load_model(source, device=args.device)
            report["kernel"] = lm.kernel
            engine_run(lm, texts[:1], 4)  # warm-up: the engine, its graphs, kernel configurations
        for k in clients:
            # the two sides take turns, run after run, so a machine whose load drifts weighs on both alike;
            # the fastest run of each is kept
            runs: dict[str, list] = {"engine": [], "http": []}
            for _ in range(args.repeat):
                if lm is not None:
                    runs["engine"].append(with_cpu(lambda k=k: engine_run(lm, texts[:k], args.new), [None]))
                http_pids = [None] + ([proc.pid] if proc is not None else [])  # the clients, and our server
                runs["http"].append(with_cpu(lambda k=k: http_run(url, model, texts[:k], args.new), http_pids))
            point = {side: max(r, key=lambda x: x["aggregate_tok_s"]) for side, r in runs.items() if r}
            for side, r in runs.items():  # the least CPU time of any run: the cost without interference
                for key in ("cpu_ms_per_token", "server_cpu_ms_per_token"):
                    if r and key in r[0]:
                        point[side][key] = min(x[key] for x in r)
            if "engine" in point:
                point["http_overhead_pct"] = round(
                    100 * (point["engine"]["aggregate_tok_s"] / point["http"]["aggregate_tok_s"] - 1), 1
                )
                point["engine_runs_tok_s"] = [r["aggregate_tok_s"] for r in runs["engine"]]
            point["http_runs_tok_s"] = [r["aggregate_tok_s"] for r in runs["http"]]
            report["results"][f"clients{k}"] = point
            print(f"{k:>2} clients", json.dumps(point), flush=True)
            if args.out:
                args.out.write_text(json.dumps(report, indent=1) + "\n")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=120)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

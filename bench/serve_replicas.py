"""Throughput of the OpenAI server with 1 and with N replicas under Ray Serve, on this machine's CPUs.

    python bench/serve_replicas.py                         # the embedded default model, 1 and 2 replicas
    python bench/serve_replicas.py --replicas 1 2 4 --clients 16 --max-tokens 64 --model ./my-gptq-model
    python bench/serve_replicas.py --url http://127.0.0.1:8000   # any OpenAI-compatible endpoint, as it is
    python bench/serve_replicas.py --device cuda --replicas 1 2 --clients 64 --max-tokens 128   # a GPU each

For each replica count it starts a local Ray instance with the app (`gptq_bridge.adapters.ray_serve`), each
replica with its share of the CPUs (torch threads = CPUs / replicas), then runs `--clients` streaming clients at
once, `--rounds` times, each asking a different question for at most `--max-tokens` tokens (greedy; an answer
may end early at EOS, and the tokens counted are the completion tokens each stream's usage reports). It reports the aggregate tokens/s (generated tokens of all clients / wall time of the round), the median and p90
time to first token, and how the requests spread over the replicas. Prints one JSON line per configuration
and a markdown table at the end; `--out FILE` writes the lines too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections import Counter

QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about a trip to the sea.",
    "Explain why the sky is blue.",
    "Describe how bread is made.",
    "Write a poem about the moon.",
    "Explain how rain forms.",
]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


async def one_round(url: str, model: str, clients: int, max_tokens: int, round_no: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    async def one(i: int):
        start = time.perf_counter()
        first = None
        tokens = 0
        q = QUESTIONS[(i + round_no) % len(QUESTIONS)] + f" (version {i})"
        raw = await client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": q}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        replica = raw.headers.get("x-gptq-bridge-replica", "-")
        async for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens, first, replica

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    tokens = sum(r[0] for r in results)
    ttfts = sorted(r[1] for r in results if r[1] is not None)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "ttft_median_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else None,
        "per_replica": dict(Counter(r[2] for r in results)),
    }


def measure(url: str, clients: int, max_tokens: int, rounds: int) -> dict:
    import httpx

    load = os.getloadavg()[0]  # other work on the machine skews the numbers
    model = httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["id"]
    asyncio.run(one_round(url, model, min(clients, 4), 8, -1))  # warm-up: engines started, caches made
    runs = [asyncio.run(one_round(url, model, clients, max_tokens, r)) for r in range(rounds)]
    best = max(runs, key=lambda r: r["tok_s"])
    return {"model": model, "load_average_before": load, "rounds": runs, "best_tok_s": best["tok_s"], "best": best}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_replicas(replicas: int, args) -> dict:
    import ray
    from ray import serve

    from gptq_bridge.adapters.ray_serve import APP_NAME, ReplicaSettings, build_app

    # Ray gives its workers the driver's sys.path, whose first entry is bench/: there, bench/kernels.py would
    # stand in for the `kernels` package that transformers imports
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    cpus = os.cpu_count() or 1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=100 * 1024 * 1024, log_to_driver=args.ray_logs)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        if args.device == "cpu":
            settings = ReplicaSettings(
                model=args.model, replicas=replicas, device="cpu", replica_cpus=max(1, cpus // replicas)
            )
        else:  # one GPU and one CPU per replica
            settings = ReplicaSettings(
                model=args.model, replicas=replicas, device="cuda", replica_gpus=1, replica_cpus=1
            )
        started = time.perf_counter()
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        ready = time.perf_counter() - started
        out = measure(f"http://127.0.0.1:{port}", args.clients, args.max_tokens, args.rounds)
        threads = max(1, cpus // replicas) if args.device == "cpu" else 1
        out.update(replicas=replicas, device=args.device, threads_per_replica=threads, startup_s=ready)
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default=None, help="model directory or hub id (default: the embedded default model)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU per replica")
    p.add_argument("--url", default=None, help="measure this OpenAI-compatible endpoint instead of starting one")
    p.add_argument("--clients", type=int, default=16, help="streaming clients at once")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("--ray-logs", action="store_true", help="show the replicas' logs")
    args = p.parse_args()
    header = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "clients": args.clients,
        "max_tokens": args.max_tokens,
    }
    lines = []
    configs = [("url", None)] if args.url else [("replicas", n) for n in args.replicas]
    for kind, n in configs:
        result = (
            measure(args.url, args.clients, args.max_tokens, args.rounds) if kind == "url" else with_replicas(n, args)
        )
        line = {**header, **result}
        lines.append(line)
        print(json.dumps(line), flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    print(
        f"\n{header['cpu']} ({header['cpus']} CPUs), {header['date']}: {args.clients} streaming clients, {args.max_tokens} tokens each"
    )
    print("| replicas | threads each | tokens/s (best of rounds) | TTFT median | TTFT p90 | requests per replica |")
    print("|---|---|---|---|---|---|")
    for line in lines:
        b = line["best"]
        print(
            f"| {line.get('replicas', args.url)} | {line.get('threads_per_replica', '-')} | {b['tok_s']:.1f} | "
            f"{b['ttft_median_s']:.2f} s | {b['ttft_p90_s']:.2f} s | {sorted(b['per_replica'].values())} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

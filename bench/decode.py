"""End-to-end decode speed: what a user gets from `lm.generate`, beside peers, on random GPTQ checkpoints.

    python bench/decode.py --shapes 7b,7b-3bit --out bench/results/decode.json [--exllama] [--hf]

For each shape it writes a random-weight GPTQ checkpoint (4-bit or 3-bit, g128, act-order) with a word-level
tokenizer, loads it with gptq_bridge, and measures through the public API:
- batch-1 decode tokens/s at contexts 512 and 4096 (the time between the first and the last streamed token);
- prefill: time to the first token for 512- and 2048-token prompts (the median of three prompts);
- aggregate tokens/s and per-stream latency with 1, 4, 8, 16 and 32 concurrent `generate` calls;
- peak GPU memory.
Peers in the same run: exllamav2 (its model, cache and forward loop) with --exllama, and transformers fp16
eager with --hf (random fp16 weights of the same shape, where they fit).

With --gpu-split 20,24 or --max-memory 0=5GiB,cpu=64GiB the same measurements run a second time on the model
split across devices (layers on the CPU run there), and `split_vs_single` gives each decode speed's ratio:
    python bench/decode.py --shapes 13b --contexts 512 --prefills 512 --streams 1,8 --new 32 \
        --max-memory 0=5GiB,cpu=64GiB --out bench/results/decode-split-13b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("bench")]  # bench/kernels.py shadows `kernels`

import torch  # noqa: E402

from gptq_bridge.engine.forward import decode_inputs  # noqa: E402
from gptq_bridge.generation import attention_backends  # noqa: E402

PREFILL_SAMPLES = 3
SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, bits
    "7b": (4096, 11008, 32, 32, 32, 32000, 4),
    "7b-3bit": (4096, 11008, 32, 32, 32, 32000, 3),
    "13b": (5120, 13824, 40, 40, 40, 32000, 4),
    "70b": (8192, 28672, 80, 64, 8, 32000, 4),
    "tiny": (256, 512, 2, 4, 2, 1000, 4),  # a check that the script runs (CPU included)
}
LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def hf_config(shape: str):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv, vocab, _ = SHAPES[shape]
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=4096 + 512,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )


def random_checkpoint(shape: str, out: Path, group_size: int = 128) -> Path:
    """Random packed weights in the GPTQ layout (act-order g_idx, zero point in the middle of the range), written
    tensor by tensor in 4 GiB shards (a 70B checkpoint never sits whole in memory, and needs ~1.1x its size
    of disk)."""
    from gptq_bridge.config import QuantizeConfig
    from gptq_bridge.packing import pack
    from gptq_bridge.writer import CheckpointWriter

    hidden, inter, layers, heads, kv, vocab, bits = SHAPES[shape]
    config = QuantizeConfig(bits=bits, group_size=group_size, desc_act=True, sym=True)
    head_dim = hidden // heads
    widths = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # drawing and packing billions of codes: on the GPU
    gen = torch.Generator(dev).manual_seed(0)
    with CheckpointWriter(out) as writer:
        for i in range(layers):
            for part, names in LINEARS.items():
                # projections of one input share their group order, as in real act-order checkpoints
                order = {
                    n_in: torch.randperm(n_in, generator=gen, device=dev).cpu()
                    for n_in in {widths[n][0] for n in names}
                }
                for name in names:
                    n_in, n_out = widths[name]
                    key = f"model.layers.{i}.{part}.{name}"
                    codes = torch.randint(0, 2**bits, (n_in, n_out), dtype=torch.int32, generator=gen, device=dev)
                    groups = -(-n_in // group_size)
                    writer.add(f"{key}.qweight", pack(codes, bits, dim=0).cpu())
                    zeros = torch.full((groups, n_out), 2 ** (bits - 1) - 1, dtype=torch.int32, device=dev)  # z - 1
                    writer.add(f"{key}.qzeros", pack(zeros, bits, dim=1).cpu())
                    scale = 2.0 / (2**bits * n_in**0.5)
                    writer.add(f"{key}.scales", torch.full((groups, n_out), scale, dtype=torch.float16))
                    writer.add(f"{key}.g_idx", (order[n_in] // group_size).to(torch.int32))
            for norm in ("input_layernorm", "post_attention_layernorm"):
                writer.add(f"model.layers.{i}.{norm}.weight", torch.ones(hidden, dtype=torch.float16))
        writer.add("model.embed_tokens.weight", torch.randn(vocab, hidden, generator=gen, device=dev).half().cpu())
        writer.add("model.norm.weight", torch.ones(hidden, dtype=torch.float16))
        head = (torch.randn(vocab, hidden, generator=gen, device=dev) / hidden**0.5).half().cpu()
        writer.add("lm_head.weight", head)
        return writer.finish(hf_config(shape), config, tokenizer=word_tokenizer(vocab), max_shard_bytes=4 << 30)


def prompt(n: int, vocab: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(0, vocab - 3, (n,), generator=g))


def stream_times(lm, text: str, new: int) -> tuple[float, list[float]]:
    """Start time and the arrival time of each streamed token."""
    start, arrivals = time.perf_counter(), []
    for chunk in lm.stream(text, max_new_tokens=new, ban_eos=True):
        arrivals += [time.perf_counter()] * len(chunk.token_ids)
    return start, arrivals


def _fill(fwd, n_prompt: int, new: int = 8):
    """A request with `n_prompt` tokens read into the cache (one prefill chunk), ready to decode."""
    from gptq_bridge.engine.scheduler import Sequence

    seq = Sequence(prompt=list(range(3, 3 + n_prompt)), max_new_tokens=new, sample=None)
    seq.blocks = fwd.cache.allocator.allocate(seq.reserve_tokens)
    fwd.clear(seq.blocks)
    fwd.prefill(seq, 0, n_prompt)
    seq.cached = n_prompt
    seq.append(5)
    return seq


def _timed(fn, reps: int) -> tuple[float, float]:
    """GPU ms and host ms per call of `fn`, after one untimed call."""
    fn()
    torch.cuda.synchronize()
    t, start, end = time.perf_counter(), torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return round(start.elapsed_time(end) / reps, 3), round(1000 * (time.perf_counter() - t) / reps, 3)


def _kernels(fn, title: str, reps: int = 3) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    print(f"--- {title}: {reps} calls", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)


def profile_step(engine) -> dict:
    """Where an engine step's time goes: graphed decode per batch bucket (GPU and host time), an eager step's
    kernels at batch 1 and 32, and a prompt read in one chunk or in chunks (`engine.scheduler.prefill_chunk`)."""
    fwd, out = engine.forward, {}
    seqs = [_fill(fwd, 511) for _ in range(32)]
    for rows in (1, 8, 16, 32):
        batch = seqs[:rows]
        for name, step in (("graph", engine.decode), ("eager", fwd.decode)):
            gpu, host = _timed(lambda step=step, batch=batch: step(batch), 20)
            out[f"{name}{rows}_gpu_ms"], out[f"{name}{rows}_host_ms"] = gpu, host
        out[f"inputs{rows}_host_ms"] = _timed(lambda batch=batch: decode_inputs(batch, fwd.cache.block_size), 20)[1]
    _kernels(lambda: fwd.decode(seqs[:1]), "eager decode, batch 1")
    _kernels(lambda: fwd.decode(seqs), "eager decode, batch 32")
    for seq in seqs:
        fwd.cache.allocator.free(seq.blocks)
    for k in (1, 8, 32):  # the engine alone (tokens delivered to a list, no consumer threads): its own step rate
        from gptq_bridge.engine.scheduler import Sequence

        done = threading.Semaphore(0)
        batch = [
            Sequence(
                prompt=list(range(3 + j, 131 + j)),
                max_new_tokens=128,
                sample=lambda logits, s: int(logits.argmax()),
                greedy=True,
                deliver=lambda item: done.release() if not isinstance(item, int) else None,
            )
            for j in range(k)
        ]
        steps, t = engine.steps, time.perf_counter()
        for seq in batch:
            engine.submit(seq)
        for _ in batch:
            done.acquire()
        wall = time.perf_counter() - t
        out[f"engine_only{k}_tok_s"] = round(128 * k / wall, 1)
        out[f"engine_only{k}_ms_per_step"] = round(1000 * wall / (engine.steps - steps), 3)
    chunk = engine.scheduler.prefill_chunk
    for n in (512, 2048):
        from gptq_bridge.engine.scheduler import Sequence

        seq = Sequence(prompt=list(range(3, 3 + n)), max_new_tokens=1, sample=None)
        seq.blocks = fwd.cache.allocator.allocate(seq.reserve_tokens)

        def whole(seq=seq, n=n):
            fwd.prefill(seq, 0, n)

        def chunked(seq=seq, n=n):
            for a in range(0, n, chunk):
                fwd.prefill(seq, a, min(a + chunk, n))

        out[f"prefill{n}_whole_gpu_ms"], out[f"prefill{n}_whole_host_ms"] = _timed(whole, 5)
        out[f"prefill{n}_chunked_gpu_ms"], out[f"prefill{n}_chunked_host_ms"] = _timed(chunked, 5)
        if n == 512:
            _kernels(whole, "prefill 512")
        else:
            _kernels(chunked, f"prefill 2048 in chunks of {chunk}", reps=1)
        fwd.cache.allocator.free(seq.blocks)
    return out


def concurrent_streams(lm, k: int, vocab: int, new: int) -> dict:
    """Aggregate tokens/s and latencies of k `lm.stream` calls in k threads at once (128-token prompts)."""
    texts = [prompt(128, vocab, 100 + j) for j in range(k)]
    lat: list[float] = [0.0] * k
    counts = [0] * k

    def worker(j):
        s, a = stream_times(lm, texts[j], new)
        lat[j], counts[j] = a[-1] - s, len(a)

    stream_times(lm, texts[0], 4)
    threads = [threading.Thread(target=worker, args=(j,)) for j in range(k)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    return {
        "aggregate_tok_s": round(sum(counts) / wall, 1),
        "latency_s": [round(x, 2) for x in sorted(lat)][:: max(1, k // 4)],
    }


def ours(
    shape: str,
    path: Path,
    contexts: list[int],
    prefills: list[int],
    streams: list[int],
    new: int,
    profile: bool = False,
    split: dict | None = None,
    lm=None,
    kv_cache: str | None = None,
) -> dict:
    """Measure a model: loaded here (with `split`, load_model's split keywords; `kv_cache`, its budget), or the
    loaded `lm` given."""
    import gptq_bridge

    vocab = SHAPES[shape][5]
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    kv = {} if kv_cache is None else {"kv_cache": int(kv_cache) if kv_cache.isdigit() else kv_cache}
    lm = lm or gptq_bridge.load_model(str(path), **(split or {}), **kv)
    res: dict = {
        "kernel": lm.kernel if lm.kernels is None else lm.kernels,
        "load_s": round(time.perf_counter() - t0, 1),
        "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
    }
    if lm.placement is not None:
        res["placement"] = lm.placement.describe()
    stream_times(lm, prompt(16, vocab), 8)  # warm-up: engine, graphs of batch 1, kernel configs
    for ctx in contexts:
        start, arr = stream_times(lm, prompt(ctx - new, vocab, ctx), new)
        res[f"decode_tok_s_ctx{ctx}"] = round((len(arr) - 1) / (arr[-1] - arr[0]), 1)
        res[f"ms_per_token_ctx{ctx}"] = round(1000 * (arr[-1] - arr[0]) / (len(arr) - 1), 3)
    for n in prefills:  # the median of three prompts: one call's time to first token moves by ~1 ms run to run
        texts = [prompt(n, vocab, n + 1 + r) for r in range(PREFILL_SAMPLES)]
        samples = []
        for text in texts:
            start, arr = stream_times(lm, text, 1)
            samples.append(round(1000 * (arr[0] - start), 2))
        res[f"prefill{n}_ms"] = sorted(samples)[len(samples) // 2]
        res[f"prefill{n}_ms_samples"] = samples
        res[f"prefill{n}_prompt_tokens"] = len(lm.tokenizer(texts[0])["input_ids"])  # past 512: no prompt graph
    for k in streams:
        res[f"streams{k}"] = concurrent_streams(lm, k, vocab, new)
    res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    engine = lm.decode_engine
    if profile and engine is not None:
        res["profile"] = profile_step(engine)
    if engine is not None:
        res["kv_cache_gib"] = round(engine.forward.cache.nbytes / 2**30, 2)
        engine.close()
    del lm, engine
    gc.collect()
    torch.cuda.empty_cache()
    return res


def exllama(path: Path, contexts: list[int], prefills: list[int], new: int) -> dict:
    # off the cuDNN attention backend, as gptq-bridge runs: it costs exllamav2 ~1.7 ms of host time a step
    with attention_backends(torch.device("cuda")):
        return _exllama(path, contexts, prefills, new)


def _exllama(path: Path, contexts: list[int], prefills: list[int], new: int) -> dict:
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

    config = ExLlamaV2Config(str(path))
    config.max_seq_len = max(contexts + prefills) + 64
    model = ExLlamaV2(config)
    res: dict = {"version": __import__("exllamav2").__version__, "load": "load_autosplit"}
    try:
        cache = ExLlamaV2Cache(model, max_seq_len=config.max_seq_len, lazy=True)
        model.load_autosplit(cache)
    except RuntimeError as exc:  # its memory probe refused the 70B shape on one 80 GB card: load it whole there
        model.unload()
        model = cache = None
        gc.collect()
        torch.cuda.empty_cache()
        model = ExLlamaV2(config)
        model.load()
        cache = ExLlamaV2Cache(model, max_seq_len=config.max_seq_len)
        res["load"] = f"load() on cuda:0 (load_autosplit: {exc})"
    vocab = config.vocab_size

    def run(n_prompt: int, n_new: int) -> tuple[float, float]:
        cache.current_seq_len = 0
        ids = torch.randint(3, vocab, (1, n_prompt))
        torch.cuda.synchronize()
        t = time.perf_counter()
        logits = model.forward(ids[:, :-1], cache, preprocess_only=True)
        logits = model.forward(ids[:, -1:], cache)
        tok = logits[:, -1].argmax(-1, keepdim=True).cpu()
        first = time.perf_counter()
        for _ in range(n_new - 1):
            logits = model.forward(tok, cache)
            tok = logits[:, -1].argmax(-1, keepdim=True).cpu()
        return first - t, time.perf_counter() - first

    run(16, 8)
    for ctx in contexts:
        _, dt = run(ctx - new, new)
        res[f"decode_tok_s_ctx{ctx}"] = round((new - 1) / dt, 1)
    for n in prefills:  # the median of three, as for gptq-bridge
        samples = [round(1000 * run(n, 1)[0], 2) for _ in range(PREFILL_SAMPLES)]
        res[f"prefill{n}_ms"] = sorted(samples)[len(samples) // 2]
        res[f"prefill{n}_ms_samples"] = samples
    model.unload()
    model = cache = None  # noqa: F841 - drops the last references before collecting
    gc.collect()
    torch.cuda.empty_cache()
    return res


def hf_eager(shape: str, contexts: list[int], new: int) -> dict:
    from transformers import DynamicCache, LlamaForCausalLM

    with torch.device("cuda"):
        model = LlamaForCausalLM(hf_config(shape)).half().eval()
    res: dict = {}
    vocab = SHAPES[shape][5]
    with torch.inference_mode(), attention_backends(torch.device("cuda")):
        for ctx in contexts:
            ids = torch.randint(3, vocab, (1, ctx - new), device="cuda")
            cache = DynamicCache(config=model.config)
            tok = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(new - 1):
                tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
                tok.item()
            res[f"decode_tok_s_ctx{ctx}"] = round((new - 1) / (time.perf_counter() - t), 1)
    del model
    torch.cuda.empty_cache()
    return res


def peer_process(name: str, path: Path, args) -> dict:
    """A peer measured in its own process: the GPU is as empty for it as for gptq-bridge, whatever the allocator
    or CUDA graphs of the run before it still hold."""
    cmd = [sys.executable, __file__, "--peer-of", str(path), "--contexts", args.contexts, "--prefills", args.prefills]
    done = subprocess.run(cmd + ["--new", str(args.new)], capture_output=True, text=True)
    if done.returncode != 0:  # a peer that cannot run is reported, not fatal
        print(done.stderr[-3000:], file=sys.stderr, flush=True)
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return {"error": lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="7b")
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--prefills", default="512,2048")
    ap.add_argument("--streams", default="1,4,8,16,32")
    ap.add_argument("--new", type=int, default=128, help="tokens generated per measurement")
    ap.add_argument("--exllama", action="store_true")
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--profile", action="store_true", help="time one graphed step and list an eager step's kernels")
    ap.add_argument("--gpu-split", default=None, metavar="GIB,GIB", help="also measure the model split: GiB per GPU")
    ap.add_argument(
        "--max-memory", default=None, metavar="DEV=SIZE,...", help="also measure the model split: 0=5GiB,cpu=64GiB"
    )
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--workdir",
        type=Path,
        help="where the random checkpoints are written (default: a temp dir); one already there is reused",
    )
    ap.add_argument("--kv-cache", help="the engine's KV budget, tokens or a size (default: load_model's)")
    ap.add_argument(
        "--switch-interval",
        type=float,
        help="sys.setswitchinterval for the concurrent-streams runs (seconds; Python's default is 0.005)",
    )
    ap.add_argument("--peer-of", type=Path, help=argparse.SUPPRESS)  # internal: run exllamav2 on this checkpoint
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    if args.peer_of:
        print(json.dumps(exllama(args.peer_of, ints(args.contexts), ints(args.prefills), args.new)))
        return
    report = {
        "device": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "bench/decode.py"] + sys.argv[1:]),
        "torch": torch.__version__,
        "results": {},
    }
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
        report["switch_interval_s"] = args.switch_interval
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gptq-bridge-decode-"))
    for shape in args.shapes.split(","):
        t = time.perf_counter()
        path = work / shape
        reused = args.workdir is not None and (path / "config.json").is_file()  # written by an earlier run
        if not reused:
            path = random_checkpoint(shape, path)
        entry: dict = {"checkpoint_s": round(time.perf_counter() - t, 1), "checkpoint_reused": reused}
        torch.cuda.empty_cache()
        if args.exllama and SHAPES[shape][6] == 4:  # first: this process holds no model yet
            entry["exllamav2"] = peer_process("exllama", path, args)
            print(shape, "exllamav2", json.dumps(entry["exllamav2"]), flush=True)
        entry["gptq_bridge"] = ours(
            shape,
            path,
            ints(args.contexts),
            ints(args.prefills),
            ints(args.streams),
            args.new,
            args.profile,
            kv_cache=args.kv_cache,
        )
        print(shape, "gptq-bridge", json.dumps(entry["gptq_bridge"]), flush=True)
        if args.gpu_split or args.max_memory:
            split = {"gpu_split": args.gpu_split} if args.gpu_split else {"max_memory": args.max_memory}
            entry["gptq_bridge_split"] = ours(
                shape, path, ints(args.contexts), ints(args.prefills), ints(args.streams), args.new, False, split
            )
            single, other = entry["gptq_bridge"], entry["gptq_bridge_split"]
            ratios = {k: round(other[k] / single[k], 3) for k in single if k.startswith("decode_tok_s")}
            ratios.update(
                {
                    f"{k}_aggregate": round(other[k]["aggregate_tok_s"] / single[k]["aggregate_tok_s"], 3)
                    for k in single
                    if k.startswith("streams")
                }
            )
            entry["split_vs_single"] = ratios
            print(shape, "gptq-bridge split", json.dumps(other), json.dumps(ratios), flush=True)

        if args.hf and shape in ("7b", "13b", "tiny"):
            entry["transformers_fp16_eager"] = hf_eager(shape, ints(args.contexts), args.new)
            print(shape, "transformers", json.dumps(entry["transformers_fp16_eager"]), flush=True)
        report["results"][shape] = entry
        if args.out:
            args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

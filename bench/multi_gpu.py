"""A 70B-shape checkpoint split across two GPUs with gpu_split, against the same checkpoint on one GPU.

    python bench/multi_gpu.py --out bench/results/multi-gpu.json            # two GPUs (bench/multi_gpu.sh)
    python bench/multi_gpu.py --dry-run --out /tmp/multi-gpu-dry.json        # one GPU, a small model

In one run:
1. writes a random Llama-2-70B-shape checkpoint, 4-bit, group 32, act-order (about 40 GB: the most accurate
   4-bit branch of the card, too large for one 24 GB card);
2. loads it on one GPU, takes 64 greedy tokens and measures batch-1 and 8-stream decode;
3. loads it with gpu_split across two GPUs (half the decoder layers on each), checks its 64 greedy tokens equal
   the single GPU's, and measures the same;
4. runs exllamav2 with its own gpu_split (batch 1 and a batch of 8) where it imports, first and in its own
   process, so the GPUs are as empty for it as for gptq-bridge.

--dry-run does all of it on one GPU with a small model: the "split" is two slots of cuda:0 (max_memory as
(device, size) pairs), so the split path runs (two segments, a CUDA graph each, hidden states handed over);
exllamav2 loads on the one GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("bench")]  # bench/kernels.py shadows `kernels`
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import decode  # noqa: E402
from gptq_bridge.generation import attention_backends  # noqa: E402

decode.SHAPES.setdefault("small", (1024, 2816, 8, 16, 4, 32000, 4))  # the dry run's model
GREEDY = 64
CONTEXT = 512


def split_options(path: Path, dry: bool, kv: int) -> dict:
    """Budgets that put half the decoder layers on each GPU (or each slot of cuda:0 in a dry run)."""
    from gptq_bridge.api import load_options
    from gptq_bridge.loader import plan_load
    from gptq_bridge.plugins import resolve

    devices = ["cuda:0", "cuda:0"] if dry else ["cuda:0", "cuda:1"]
    plan = plan_load(resolve(str(path)), load_options(max_memory=[(devices[0], "1000GiB")], kv_cache=kv))
    s = plan.sizes[devices[0]]
    half = len(s.layers) // 2
    first = s.embed + sum(s.layers[:half]) + half * s.kv_per_layer + 2**20  # 1 MiB over: GiB floats round
    rest = sum(s.layers[half:]) + (len(s.layers) - half) * s.kv_per_layer + s.head
    if dry:
        return {"max_memory": [(devices[0], f"{first}B"), (devices[1], f"{rest + 2**28}B")], "kv_cache": kv}
    return {"gpu_split": [first / 2**30, (rest + 2**30) / 2**30], "kv_cache": kv}


def greedy_tokens(lm, vocab: int) -> list[int]:
    return lm.generate(decode.prompt(32, vocab, 7), max_new_tokens=GREEDY, ban_eos=True).token_ids


def measure(shape: str, path: Path, options: dict, streams: list[int], new: int) -> tuple[dict, list[int]]:
    """The greedy tokens, then decode.ours (batch-1 decode at one context, concurrent streams), on one load."""
    import gptq_bridge

    t = time.perf_counter()
    lm = gptq_bridge.load_model(str(path), **options)
    load_s = round(time.perf_counter() - t, 1)
    tokens = greedy_tokens(lm, decode.SHAPES[shape][5])
    per_gpu = {f"cuda:{i}": round(torch.cuda.memory_allocated(i) / 2**30, 2) for i in range(torch.cuda.device_count())}
    res = decode.ours(shape, path, [CONTEXT], [], streams, new, lm=lm)  # closes the engine at the end
    res["load_s"] = load_s
    res["gib_per_gpu_after_first_call"] = per_gpu
    del lm
    gc.collect()
    torch.cuda.empty_cache()
    return res, tokens


def exllama_split(path: Path, gpu_split: list[float] | None, streams: list[int], new: int) -> dict:
    with attention_backends(torch.device("cuda")):
        return _exllama_split(path, gpu_split, streams, new)


def _exllama_split(path: Path, gpu_split: list[float] | None, streams: list[int], new: int) -> dict:
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

    config = ExLlamaV2Config(str(path))
    config.max_seq_len = CONTEXT + new + 64
    model = ExLlamaV2(config)
    res: dict = {"version": __import__("exllamav2").__version__, "gpu_split": gpu_split}
    model.load(gpu_split=gpu_split)
    vocab = config.vocab_size
    for k in streams:
        cache = ExLlamaV2Cache(model, batch_size=k, max_seq_len=config.max_seq_len)
        ids = torch.randint(3, vocab, (k, CONTEXT - new))

        def run(n_new: int, cache=cache, ids=ids) -> float:
            cache.current_seq_len = 0
            model.forward(ids[:, :-1], cache, preprocess_only=True)
            tok = model.forward(ids[:, -1:], cache)[:, -1].argmax(-1, keepdim=True).cpu()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n_new - 1):
                tok = model.forward(tok, cache)[:, -1].argmax(-1, keepdim=True).cpu()
            return time.perf_counter() - t

        run(8)
        dt = run(new)
        res[f"streams{k}_aggregate_tok_s"] = round(k * (new - 1) / dt, 1)
        del cache
        gc.collect()
    model.unload()
    model = None  # noqa: F841
    gc.collect()
    torch.cuda.empty_cache()
    return res


def exllama_process(path: Path, gpu_split: list[float] | None, args) -> dict:
    """exllamav2 in its own process (a peer that cannot run is reported, not fatal)."""
    cmd = [sys.executable, __file__, "--exllama-of", str(path), "--streams", args.streams, "--new", str(args.new)]
    cmd += ["--exllama-split", ",".join(f"{x:.3f}" for x in gpu_split or [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr, flush=True)
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return {"error": lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="one GPU, a small model: checks the script end to end")
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--new", type=int, default=128, help="tokens decoded per measurement")
    ap.add_argument("--kv-cache", type=int, default=8192, help="KV-cache tokens of every load")
    ap.add_argument("--no-exllama", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--workdir", type=Path, help="where the random checkpoint is written (default: a temp dir)")
    ap.add_argument("--exllama-of", type=Path, help=argparse.SUPPRESS)  # internal: exllamav2 on this checkpoint
    ap.add_argument("--exllama-split", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    streams = [int(x) for x in args.streams.split(",") if x]
    if args.exllama_of:
        split = [float(x) for x in args.exllama_split.split(",") if x] or None
        print(json.dumps(exllama_split(args.exllama_of, split, streams, args.new)))
        return 0
    if not args.dry_run and torch.cuda.device_count() < 2:
        print(f"needs two GPUs, torch sees {torch.cuda.device_count()}; --dry-run runs on one", file=sys.stderr)
        return 2
    shape = "small" if args.dry_run else "70b"
    report: dict = {
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "bench/multi_gpu.py"] + sys.argv[1:]),
        "torch": torch.__version__,
        "shape": shape,
        "checkpoint": "random, 4-bit, group 32, act-order",
    }
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gptq-bridge-multi-gpu-"))
    t = time.perf_counter()
    path = work / f"{shape}-4bit-32g"
    if not (path / "config.json").is_file():  # a checkpoint left by an earlier run in --workdir is reused
        path = decode.random_checkpoint(shape, path, group_size=32)
    size = sum(f.stat().st_size for f in path.iterdir())
    report["checkpoint_gb"] = round(size / 1e9, 2)
    report["checkpoint_s"] = round(time.perf_counter() - t, 1)
    print(f"checkpoint: {path} ({size / 1e9:.1f} GB in {report['checkpoint_s']} s)", flush=True)

    options = split_options(path, args.dry_run, args.kv_cache)
    exl = None
    if not args.no_exllama:
        gpu_split = None if args.dry_run else options["gpu_split"]
        exl = exllama_process(path, gpu_split, args)
        print("exllamav2", json.dumps(exl), flush=True)
    single, want = measure(shape, path, {"device": "cuda:0", "kv_cache": args.kv_cache}, streams, args.new)
    report["single_gpu"] = single
    print("single GPU", json.dumps(single), flush=True)
    split, got = measure(shape, path, options, streams, args.new)
    report["split"] = split
    report["split_options"] = {k: v for k, v in options.items()}
    print("split", json.dumps(split), flush=True)
    same = sum(a == b for a, b in zip(got, want))
    report["greedy_equal"] = {"steps": GREEDY, "equal": same, "all": got == want}
    print(f"greedy tokens: {same}/{GREEDY} equal to the single GPU's", flush=True)
    ratios = {"batch1": round(split[f"decode_tok_s_ctx{CONTEXT}"] / single[f"decode_tok_s_ctx{CONTEXT}"], 3)}
    for k in streams:
        key = f"streams{k}"
        ratios[f"{key}_aggregate"] = round(split[key]["aggregate_tok_s"] / single[key]["aggregate_tok_s"], 3)
    report["split_vs_single"] = ratios
    print("split / single", json.dumps(ratios), flush=True)

    if exl is not None and "error" not in exl:
        # batch 1: our decode speed between first and last token; batches: aggregate over the whole run (our
        # figure includes reading the prompts, exllamav2's does not)
        ours = {
            f"streams{k}": split[f"decode_tok_s_ctx{CONTEXT}"] if k == 1 else split[f"streams{k}"]["aggregate_tok_s"]
            for k in streams
        }
        exl["split_vs_exllamav2"] = {
            k: round(v / exl[f"{k}_aggregate_tok_s"], 3) for k, v in ours.items() if exl.get(f"{k}_aggregate_tok_s")
        }
        print("split / exllamav2 split", json.dumps(exl["split_vs_exllamav2"]), flush=True)
    if exl is not None:
        report["exllamav2_split"] = exl
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if got == want else 1


if __name__ == "__main__":
    sys.exit(main())

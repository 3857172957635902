"""Peak host memory while loading stays below ~1.3x the checkpoint's size (measured in a fresh process)."""

import subprocess
import sys
import textwrap

from tiny_checkpoints import build, llama_config


def test_peak_host_memory_while_loading(tmp_path):
    # ~75 MB of weights: large enough that allocator noise is small next to it.
    cfg = llama_config(hidden=1024, intermediate=2816, layers=4, vocab=8000)
    ck = build(tmp_path / "ck", bits=4, group_size=128, desc_act=True, hf_config=cfg, max_shard_bytes=20_000_000)
    size = sum(p.stat().st_size for p in ck.path.glob("*.safetensors"))
    del ck
    script = textwrap.dedent(f"""
        import torch, transformers, gptq_bridge
        from transformers import LlamaForCausalLM  # import costs stay outside the measurement:
        gptq_bridge.registered_kernels()  # the plugin manager imports every built-in plugin (triton too)
        def status_kb(key):
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith(key))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current resident size
        before = status_kb("VmRSS")
        lm = gptq_bridge.load_model({str(tmp_path / "ck")!r}, device="cpu", dtype=torch.float16, kernel="torch")  # torch-dense would add its dense copy
        print(before, status_kb("VmHWM"))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    before_kb, peak_kb = map(int, out.split())
    assert peak_kb > before_kb, "the peak must include the load"
    grown = (peak_kb - before_kb) * 1024
    print(f"loading grew the process by {grown / size:.2f}x the checkpoint size")
    assert grown < 1.3 * size, f"loading grew the process by {grown / size:.2f}x the checkpoint size ({size} bytes)"

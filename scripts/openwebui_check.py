"""Open WebUI against `gptq-bridge serve`, driven by a real headless browser: it lists the model and streams an answer.

Run it with a Python that has `open-webui` and `playwright` installed (a venv of its own: Open WebUI pins many
packages), on a machine with Debian's chromium:

    python3.11 -m venv /tmp/owui-venv && /tmp/owui-venv/bin/pip install torch==2.13.0 && \
        /tmp/owui-venv/bin/pip install open-webui playwright && apt-get install -y chromium
    /tmp/owui-venv/bin/python scripts/openwebui_check.py --gptq-bridge .venv/bin/gptq-bridge \
        --screenshot docs/img/openwebui.png

It starts `gptq-bridge serve` (the embedded default model unless --model), then Open WebUI with no login, no
Ollama and no downloads, pointed at the server as its OpenAI API; opens Open WebUI in chromium, checks that the
model selector shows the served model, asks a question, and samples the answer while it grows: the check
passes when the answer appeared in several steps (streamed, not all at once) and names the expected word.
Exit status 0 when it passes; every step prints what it saw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not answer {url} within {seconds:.0f} s")
        time.sleep(0.5)


def openwebui_env(data_dir: Path, api_base: str, api_key: str) -> dict:
    """Open WebUI with one OpenAI connection (ours), no login, and nothing fetched from the network."""
    return dict(
        os.environ,
        DATA_DIR=str(data_dir),
        WEBUI_AUTH="False",  # a single-user instance: no sign-up page
        WEBUI_SECRET_KEY="gptq-bridge-check",
        ENABLE_OLLAMA_API="False",
        ENABLE_OPENAI_API="True",
        OPENAI_API_BASE_URL=api_base,
        OPENAI_API_KEY=api_key,
        OFFLINE_MODE="True",  # no version checks, no model downloads
        HF_HUB_OFFLINE="1",
        BYPASS_EMBEDDING_AND_RETRIEVAL="True",  # no embedding model (it would be downloaded)
        RAG_EMBEDDING_MODEL_AUTO_UPDATE="False",
        ENABLE_VERSION_UPDATE_CHECK="False",
        # no extra generations (titles, tags, follow-ups) competing with the answer on a small CPU
        ENABLE_TITLE_GENERATION="False",
        ENABLE_TAGS_GENERATION="False",
        ENABLE_FOLLOW_UP_GENERATION="False",
        ENABLE_AUTOCOMPLETE_GENERATION="False",
        ANONYMIZED_TELEMETRY="False",
        DO_NOT_TRACK="True",
        SCARF_NO_ANALYTICS="True",
    )


async def drive(ui_url: str, model: str, question: str, screenshot: Path | None, settle: float = 6.0) -> dict:
    from playwright.async_api import async_playwright

    profile = tempfile.mkdtemp(prefix="openwebui-check-chromium-")
    async with async_playwright() as p:
        ctx = await p.chromium.launch_persistent_context(
            profile,
            executable_path=shutil.which("chromium") or "/usr/bin/chromium",
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1280, "height": 800},
        )
        try:
            page = ctx.pages[0] if ctx.pages else await ctx.new_page()
            await page.goto(ui_url, wait_until="load", timeout=180_000)
            try:  # the release-notes dialog of a first visit
                await page.get_by_text("Okay, Let's Go!").click(timeout=30_000)
            except Exception:  # noqa: BLE001 - not every version shows it
                pass
            selector = page.locator("#model-selector-model-button")
            await selector.wait_for(timeout=120_000)
            shown = (await selector.get_attribute("aria-label")) or await selector.inner_text()
            print(f"model selector: {shown!r}", flush=True)
            if model not in shown:
                raise SystemExit(f"the model selector shows {shown!r}, not {model!r}")
            box = page.locator("#chat-input")
            await box.click()
            await page.keyboard.type(question)
            await page.keyboard.press("Enter")
            answer = page.locator("#response-content-container").last
            await answer.wait_for(timeout=120_000)
            seen: list[str] = []
            changed = time.monotonic()
            deadline = changed + 300
            # the answer is complete when it has stopped growing for `settle` seconds (a small CPU may pause a
            # stream for a second or two while it reads another request's prompt)
            while time.monotonic() < deadline and not (seen and time.monotonic() - changed > settle):
                text = (await answer.inner_text()).strip()
                if text and (not seen or text != seen[-1]):
                    seen.append(text)
                    changed = time.monotonic()
                await asyncio.sleep(0.05)
            final = (await answer.inner_text()).strip()
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(screenshot))
                print(f"screenshot: {screenshot}", flush=True)
        finally:
            await ctx.close()
    return {"model_shown": shown, "answer": final, "partial_texts": len(seen), "first_partial": seen[0] if seen else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gptq-bridge", default="gptq-bridge", help="the gptq-bridge command (its own venv)")
    ap.add_argument("--model", default=None, help="model source for gptq-bridge serve (default: the default model)")
    ap.add_argument("--serve-url", default=None, help="use this running server (…/v1) instead of starting one")
    ap.add_argument("--open-webui", default=str(Path(sys.executable).with_name("open-webui")))
    ap.add_argument("--question", default="What is the capital of Japan? Tell me about it.")
    ap.add_argument("--expect", default="Tokyo", help="a word the answer must contain")
    ap.add_argument("--screenshot", type=Path, default=None)
    args = ap.parse_args()

    procs: list[subprocess.Popen] = []
    work = Path(tempfile.mkdtemp(prefix="openwebui-check-"))
    try:
        if args.serve_url:
            api = args.serve_url.rstrip("/")
        else:
            port = free_port()
            cmd = [args.gptq_bridge, "serve", "--port", str(port)] + (["--model", args.model] if args.model else [])
            print("starting:", " ".join(cmd), flush=True)
            procs.append(subprocess.Popen(cmd))
            wait_http(f"http://127.0.0.1:{port}/health", procs[-1], 900, "gptq-bridge serve")
            api = f"http://127.0.0.1:{port}/v1"
        with urllib.request.urlopen(api + "/models", timeout=30) as r:
            model = json.load(r)["data"][0]["id"]
        print(f"gptq-bridge serve at {api} serves {model}", flush=True)

        ui_port = free_port()
        cmd = [args.open_webui, "serve", "--host", "127.0.0.1", "--port", str(ui_port)]
        print("starting:", " ".join(cmd), flush=True)
        log = open(work / "open-webui.log", "w")  # noqa: SIM115 - open for the process's life
        procs.append(subprocess.Popen(cmd, env=openwebui_env(work / "data", api, "unused"), stdout=log, stderr=log))
        ui = f"http://127.0.0.1:{ui_port}"
        wait_http(ui + "/health", procs[-1], 600, f"Open WebUI (log: {work / 'open-webui.log'})")
        print(f"Open WebUI at {ui}", flush=True)

        seen = asyncio.run(drive(ui, model, args.question, args.screenshot))
        print(json.dumps(seen, indent=1), flush=True)
        if args.expect.lower() not in seen["answer"].lower():
            print(f"FAIL: the answer does not name {args.expect!r}")
            return 1
        if seen["partial_texts"] < 3:
            print(f"FAIL: the answer appeared in {seen['partial_texts']} step(s), not streamed")
            return 1
        print(f"OK: Open WebUI lists {model} and streamed its answer in {seen['partial_texts']} steps")
        return 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())

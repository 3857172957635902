"""What every adapter needs: the shared loaded model for a source (None = the embedded default model)."""

from __future__ import annotations

from ..loaded_model import LoadedModel


def source_or_default(source: str | None) -> str:
    if source:
        return source
    from ..default_model import default_source

    return default_source()


def shared_model(source: str | None, *, kernel: str = "auto", device: str | None = None, **split) -> LoadedModel:
    """The process-wide loaded model for `source`: adapters naming the same checkpoint share one copy. `split`:
    `load_model`'s gpu_split / max_memory / device_map (a model split across devices)."""
    from ..model_cache import get_model

    return get_model(source_or_default(source), kernel=kernel, device=device, **split)


def model_display_name(loaded: LoadedModel) -> str:
    """A short, stable name for frontends: the hub id (with branch) or the directory name."""
    if loaded.source.repo_id:
        rev = loaded.source.revision
        return f"{loaded.source.repo_id}:{rev}" if rev and rev != "main" else loaded.source.repo_id
    return loaded.source.path.name


async def iterate_in_thread(make_stream):
    """Run a blocking generation stream in a worker thread and yield its chunks without blocking the loop.

    `make_stream()` returns a `GenerationStream`. If the consumer stops early, the generation is cancelled.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    stream = make_stream()

    def pump():
        try:
            with stream:
                for chunk in stream:
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            loop.call_soon_threadsafe(queue.put_nowait, done)
        except BaseException as exc:  # handed to the consumer, raised there
            loop.call_soon_threadsafe(queue.put_nowait, exc)

    worker = loop.run_in_executor(None, pump)
    try:
        while True:
            item = await queue.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stream.cancel()
        await worker

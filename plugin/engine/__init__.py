"""The decode engine: a paged KV cache shared by all requests, continuous batching, and (on CUDA) graphs.

kv_cache.py   the block pool and its allocator
scheduler.py  which requests run at each step (pure bookkeeping)
forward.py    the Llama-family forward over the paged cache
engine.py     the worker thread that runs steps and hands out tokens
generator.py  the `gptq_generate` plugin that routes Llama-family models here
"""

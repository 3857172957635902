"""Frontend adapters (text-generation-webui, LangChain, LlamaIndex), each in its own module.

Each adapter imports its frontend lazily, so `gptq_bridge` works without any of them installed.
"""

import os

# Tests never touch the network: huggingface_hub reads this once, at import, so it is set before any import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

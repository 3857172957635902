"""gptq-bridge's own CUDA kernel, `mma`: the CUDA sources, their nvcc build (build.py) and the module (mma.py)."""

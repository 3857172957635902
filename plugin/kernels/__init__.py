"""Quantized Linear kernels. Each module here is a plugin that registers its kernels through the hooks."""

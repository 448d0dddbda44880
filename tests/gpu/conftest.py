"""Fixtures of the GPU tests: the lora tests' small random Llama."""

from lora_support import _one_torch_thread, llama_dir  # noqa: F401

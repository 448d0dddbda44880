"""Fixtures for the lorafleet.lora tests, shared with the other lora test folder."""

from lora_support import _one_torch_thread, llama, llama_dir  # noqa: F401

"""Model building (the tiny model) and loading (any HF causal LM directory).

Importing this package does not import torch; the functions that need it do.
"""

from lorafleet.models.cache import (
    TINY_MODEL_NAME,
    default_cache_dir,
    ensure_tiny_model,
    load_model,
    tiny_model_path,
)

__all__ = [
    "TINY_MODEL_NAME",
    "default_cache_dir",
    "ensure_tiny_model",
    "load_model",
    "tiny_model_path",
]

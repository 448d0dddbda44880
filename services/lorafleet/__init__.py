"""lorafleet: many RL experiments at once on shared, always-hot LLM engines."""

__version__ = "0.1.0"

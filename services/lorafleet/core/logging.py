"""structlog set up once, in ``__main__``, for structlog and stdlib loggers alike.

Everything goes through one stdlib handler on stderr so that records from grpc,
sqlalchemy, vllm, ... are rendered the same way (JSON lines in containers, coloured
console in a terminal) and carry the same request context.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "json", "console"]

# Marks the handler this module installs, so reconfiguring replaces it instead of
# stacking a second one (and never touches handlers someone else installed).
_HANDLER_NAME = "lorafleet"


def _shared_processors() -> list[structlog.typing.Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        structlog.processors.StackInfoRenderer(),
    ]


def resolve_format(fmt: LogFormat) -> Literal["json", "console"]:
    """``auto`` means console when a person is watching stderr, JSON otherwise."""
    if fmt == "auto":
        return "console" if sys.stderr.isatty() else "json"
    return fmt


def configure_logging(fmt: LogFormat = "auto", level: str = "info") -> None:
    """Configure structlog and the root stdlib logger; safe to call again.

    Loggers are not cached on first use, so a second call (or structlog's
    ``capture_logs`` in tests) takes effect for module-level ``log`` objects too.
    """
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")

    if resolve_format(fmt) == "json":
        renderers: list[structlog.typing.Processor] = [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ]
    else:
        renderers = [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        # Records from plain stdlib loggers get the same fields as ours.
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderers],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)

"""Structured logging: one structlog chain for vnpd and the standard library.

Every log line in vnpd goes through ``structlog.get_logger()``. ``configure_logging``
sets the renderer (JSON lines for journald, or a console renderer on a TTY) and
routes standard-library loggers (torch, h5py, watchdog, asyncio) through the same
processors, so a journald reader sees one format.

Example::

    configure_logging("json", "info", worker="cuda:0")
    structlog.get_logger().info("batch_done", batch=12)
    # {"event": "batch_done", "batch": 12, "worker": "cuda:0", "level": "info", ...}
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``"auto"`` means console on a TTY and JSON otherwise; other values pass through."""
    if fmt == "auto":
        return "console" if stream.isatty() else "json"
    if fmt not in ("json", "console"):
        raise ValueError(f"logging format must be json, console or auto, not {fmt!r}")
    return fmt


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None,
                      **bound: Any) -> None:
    """Configure structlog and the stdlib root logger to write one chain to ``stream``.

    ``bound`` key/values (for example ``worker="cuda:0"``) are added to every line,
    including lines that come from standard-library loggers.
    """
    stream = stream if stream is not None else sys.stderr
    fmt = resolve_format(fmt, stream)
    if level.lower() not in _LEVELS:
        raise ValueError(f"logging level must be one of {sorted(_LEVELS)}, not {level!r}")
    numeric = _LEVELS[level.lower()]

    def add_bound(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        for key, value in bound.items():
            event.setdefault(key, value)
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_bound,
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)
    route_library_loggers()


# Libraries that install their own handler and stop propagation at import time.
_SELF_HANDLING = ("torch", "torch._dynamo", "torch._inductor", "torch.distributed")


def route_library_loggers() -> None:
    """Send torch's loggers through the root (our chain) instead of torch's own handler.

    torch configures its loggers when it is imported, so call this again after importing it.
    """
    import sys

    if "torch" not in sys.modules:
        return
    for name in _SELF_HANDLING:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True

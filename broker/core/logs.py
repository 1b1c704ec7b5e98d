"""structlog setup: JSON when not on a terminal, and a processor that redacts by key.

Log calls only ever pass fixed fields (ref, consumer, route, status, ids); the redactor
is defence in depth for anything named like a credential or a body.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from broker.core.text import printable

_REDACT = ("authorization", "token", "value", "body", "password", "passphrase", "key",
           "secret", "cookie")
_ALLOWED = {"secret_ref", "token_id", "key_name", "lease_id"}


@functools.lru_cache(maxsize=1024)
def _redacted(name: str) -> bool:
    """Whether a field of this name is redacted (log calls use a few fixed names: cached)."""
    lowered = name.lower()
    return name not in _ALLOWED and any(word in lowered for word in _REDACT)


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]
           ) -> MutableMapping[str, Any]:
    for name in list(event):
        if _redacted(name):
            event[name] = "[redacted]"
    return event


class _ErrorTypeOnly(logging.Filter):
    """aiohttp logs a request it cannot parse with the raw offending line (an Authorization
    header, a token) and a traceback; asyncio may log exception text too. Re-log such a
    record as one JSON event naming only the error type, and drop the original."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        structlog.get_logger(record.name).warning(
            "internal.error", logger=record.name, error=type(exc).__name__ if exc else None)
        return False


_STDLIB_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal",
                   "aiohttp.client", "asyncio")


def _console_renderer() -> Any:
    """structlog's console lines, with any control character left in them (the event text,
    a traceback) escaped, so a logged request cannot drive the terminal it is shown on."""
    render = structlog.dev.ConsoleRenderer(colors=False)

    def rendered(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        return printable(str(render(logger, method, event)), lines=True)

    return rendered


def configure(fmt: str | None) -> None:
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = structlog.processors.JSONRenderer() if fmt == "json" else _console_renderer()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        # One write per line: workers share stderr, and two writes could interleave. Both
        # renderers escape every control character themselves (JSON as \u001b), so the
        # CLI's escaping wrapper around stderr is skipped.
        logger_factory=structlog.WriteLoggerFactory(getattr(sys.stderr, "unescaped",
                                                            sys.stderr)),
        cache_logger_on_first_use=True,
    )
    for name in _STDLIB_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ErrorTypeOnly) for f in logger.filters):
            logger.addFilter(_ErrorTypeOnly())

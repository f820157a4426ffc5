"""Keep secrets out of uvicorn's log lines.

uvicorn logs every request line with its query string ("uvicorn.access") and every WebSocket
handshake with its URL ("uvicorn.error"); a realtime client may pass its API key as
`?api_key=`. Query values are replaced by `***` unless the parameter is known to be harmless.
"""

from __future__ import annotations

import logging
import re

#: Query parameters whose values are safe (and useful) to log.
SAFE_PARAMS = frozenset({"intent", "model"})
REDACTED = "***"
#: `?name=value` / `&name=value` up to the next separator or whitespace/quote.
_QUERY_PAIR = re.compile(r"([?&])([^=&\s\"#]*)=([^&\s\"#]*)")
#: The loggers uvicorn writes URLs to.
URL_LOGGERS = ("uvicorn.access", "uvicorn.error")


def redact_query(text: str) -> str:
    """`/v1/realtime?intent=transcription&api_key=sk-1` -> `...&api_key=***`."""

    def replace(match: re.Match[str]) -> str:
        sep, name, value = match.groups()
        return match.group(0) if name in SAFE_PARAMS else f"{sep}{name}={REDACTED}"

    return _QUERY_PAIR.sub(replace, text) if "=" in text else text


class RedactQueryFilter(logging.Filter):
    """Rewrites a record's message with every unsafe query value replaced."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_query(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        if isinstance(record.msg, str):
            record.msg = redact_query(record.msg)
        return True


def install() -> None:
    """Attach the filter to uvicorn's loggers (idempotent)."""
    for name in URL_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactQueryFilter) for f in logger.filters):
            logger.addFilter(RedactQueryFilter())

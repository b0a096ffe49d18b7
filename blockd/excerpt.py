"""Quoting text from files in error messages, bounded: a 500 MB line must never become a 500 MB
error (in the log, the reload status file and `blockd check`'s output).  Pure; no config, no metrics.
"""

from __future__ import annotations

EXCERPT_CHARS = 100


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """repr() of at most `limit` characters of text, followed by "…" when it was cut."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + "…"


def clip(text: str, limit: int = EXCERPT_CHARS) -> str:
    """Free text (another library's error message, which may echo its input) cut to `limit`."""
    return text if len(text) <= limit else text[:limit] + "…"

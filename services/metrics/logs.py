"""Logging setup, in one place: key=value lines on stderr."""

from __future__ import annotations

import logging
import sys

__all__ = ["configure_logging"]

_FORMAT = "ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


def configure_logging(level: str) -> None:
    """Send every log record to stderr as one key=value line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # kafka-python logs every connection step at INFO, Alembic its plugins
    # and httpx every request (the feed source polls several times a
    # second); keep their warnings only.
    for noisy in ("kafka", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))

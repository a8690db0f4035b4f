"""The errors of the metrics service.

Every error the service raises derives from `MetricsError`. An error says
whether trying again may help (`retriable`); the retry loops ask it.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "EventRejected",
    "FeedProtocolError",
    "FeedUnavailable",
    "MetricsError",
    "OffsetConflict",
    "ProcessFileError",
    "StorageUnavailable",
    "UnknownProcess",
]


class MetricsError(Exception):
    """Base of every error raised by the metrics service."""

    retriable = False


class ConfigurationError(MetricsError):
    """The configuration is invalid; the message names the setting and the rule."""


class ProcessFileError(ConfigurationError):
    """A process file cannot be read or breaks the shape the service reads."""


class UnknownProcess(MetricsError):
    """A query names a process that no process file declares."""

    def __init__(self, process: str) -> None:
        super().__init__(f"process={process!r} is not declared by any process file")
        self.process = process


class EventRejected(MetricsError):
    """An event cannot be applied to the read models; it is parked."""


class OffsetConflict(MetricsError):
    """Another projector advanced the stored offsets first; the batch was
    rolled back and the source must seek to the stored offsets again."""

    retriable = True


class FeedUnavailable(MetricsError):
    """The progression feed cannot be reached or answered with a server error."""

    retriable = True


class FeedProtocolError(MetricsError):
    """The progression feed refused the request or answered something that is
    not a feed page (wrong URL, wrong token, incompatible version)."""


class StorageUnavailable(MetricsError):
    """The read-model database cannot be reached or refused the transaction
    for a reason that may pass (connection lost, lock timeout)."""

    retriable = True


class HistoryIncomplete(MetricsError):
    """The source no longer holds the beginning of the history (Kafka's
    retention removed it), so a rebuild from it would lose events."""

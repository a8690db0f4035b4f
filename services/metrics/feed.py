"""The HTTP feed source: reads the progression service's event feed.

`GET {url}/v1/feed?after=POSITION&limit=N` answers
`{"events": [recorded envelopes in position order], "next_after": N}`.
The last position applied is stored with the read models, in the same
transaction, so a restart goes on exactly where the last batch ended.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx

from metrics.errors import (
    FeedProtocolError,
    FeedUnavailable,
    OffsetConflict,
    StorageUnavailable,
)
from metrics.progress import FeedProgress
from metrics.projection import Incoming, Projection
from metrics.settings import Settings

__all__ = ["FeedClient", "FeedPage", "FeedSource"]

logger = logging.getLogger(__name__)


class FeedPage:
    def __init__(
        self,
        events: list[dict[str, Any]],
        next_after: int,
        head_position: int | None = None,
    ) -> None:
        self.events = events
        self.next_after = next_after
        # The log's last position when the page was read, if the feed says.
        self.head_position = head_position


class FeedClient:
    """A small client of the progression feed; errors are translated into
    `FeedUnavailable` (worth retrying) or `FeedProtocolError` (not)."""

    def __init__(self, settings: Settings) -> None:
        headers = {"accept": "application/json"}
        if settings.feed_token is not None:
            headers["authorization"] = (
                f"Bearer {settings.feed_token.get_secret_value()}"
            )
        self.url = settings.feed_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=settings.feed_timeout_ms / 1000,
        )

    def close(self) -> None:
        self._client.close()

    def fetch(self, after: int, limit: int) -> FeedPage:
        try:
            response = self._client.get(
                "/v1/feed", params={"after": after, "limit": limit}
            )
        except httpx.HTTPError as error:
            raise FeedUnavailable(f"url={self.url} after={after}: {error!r}") from error
        if response.status_code >= 500 or response.status_code == 429:
            raise FeedUnavailable(
                f"url={self.url} after={after}: status={response.status_code}"
            )
        if response.status_code != 200:
            raise FeedProtocolError(
                f"url={self.url} after={after}: status={response.status_code} "
                f"body={response.text[:300]!r}"
            )
        try:
            body = response.json()
        except ValueError:
            raise FeedProtocolError(
                f"url={self.url} after={after}: the answer is not JSON"
            ) from None
        events = body.get("events") if isinstance(body, dict) else None
        next_after = body.get("next_after") if isinstance(body, dict) else None
        if (
            not isinstance(events, list)
            or not isinstance(next_after, int)
            or next_after < after
        ):
            raise FeedProtocolError(
                f"url={self.url} after={after}: not a feed page (needs an 'events' "
                "list and an integer 'next_after' not below 'after')"
            )
        head = body.get("head_position")
        return FeedPage(events, next_after, head if isinstance(head, int) else None)


class FeedSource:
    """Polls the feed and applies every page, until `stop` is set."""

    def __init__(
        self, settings: Settings, projection: Projection, progress: FeedProgress
    ) -> None:
        self._settings = settings
        self._projection = projection
        self._progress = progress
        self._client = FeedClient(settings)
        self.applied = 0
        self.caught_up = threading.Event()
        # The log's last position as the feed last gave it (None: not known).
        self.head_position: int | None = None

    def run(self, stop: threading.Event) -> None:
        settings = self._settings
        idle_s = settings.feed_poll_interval_ms / 1000
        backoff_max_s = settings.feed_backoff_max_ms / 1000
        delay_s = idle_s
        stored = self._progress.stored()
        logger.info("feed source started url=%s position=%s", self._client.url, stored)
        try:
            while not stop.is_set():
                after = stored or 0
                try:
                    page = self._client.fetch(after, settings.feed_page_limit)
                except FeedUnavailable as error:
                    delay_s = min(backoff_max_s, max(idle_s, delay_s * 2))
                    logger.warning(
                        "feed unreachable, retrying position=%d retry_in_s=%.1f "
                        "error=%s",
                        after,
                        delay_s,
                        error,
                    )
                    stop.wait(delay_s)
                    continue
                except FeedProtocolError as error:
                    logger.error(
                        "feed refused, giving up position=%d error=%s", after, error
                    )
                    raise
                delay_s = idle_s
                if page.head_position is not None:
                    self.head_position = page.head_position
                if not page.events:
                    self.caught_up.set()
                    stop.wait(idle_s)
                    continue
                batch = [Incoming(event, source="feed") for event in page.events]
                try:
                    result = self._projection.apply(
                        batch, self._progress.writer(stored, page.next_after)
                    )
                except OffsetConflict as error:
                    logger.warning(
                        "feed position moved, rereading position=%d error=%s",
                        after,
                        error,
                    )
                    stored = self._progress.stored()
                    continue
                except StorageUnavailable as error:
                    delay_s = min(backoff_max_s, max(idle_s, delay_s * 2))
                    logger.warning(
                        "database unavailable, retrying position=%d retry_in_s=%.1f "
                        "error=%s",
                        after,
                        delay_s,
                        error,
                    )
                    stop.wait(delay_s)
                    stored = self._safe_stored(stored)
                    continue
                stored = page.next_after
                self.applied += result.applied
                logger.debug(
                    "feed page applied position=%d applied=%d skipped=%d parked=%d",
                    stored,
                    result.applied,
                    result.skipped,
                    result.parked,
                )
                if len(page.events) < settings.feed_page_limit:
                    self.caught_up.set()
        finally:
            self._client.close()
            logger.info("feed source stopped position=%s", stored)

    def _safe_stored(self, fallback: int | None) -> int | None:
        try:
            return self._progress.stored()
        except StorageUnavailable:
            return fallback

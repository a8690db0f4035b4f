"""The feed source against a small real HTTP server started in the test.

The server is a stub of the progression service's `GET /v1/feed`: the feed
is the metrics service's own unit boundary, and this test checks the
metrics side of it (paging, stored position, restarts, an unreachable feed).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from pydantic import SecretStr

from metrics.feed import FeedSource
from metrics.progress import FeedProgress
from metrics.settings import Settings
from tests.integration.metrics.scenario import scenario
from tests.unit.metrics.conftest import Projected


class StubFeed:
    """Serves `events` as the progression feed does; `delay_s` slows every
    page down (a long history read from far away)."""

    def __init__(
        self, events: list[dict[str, Any]], port: int = 0, delay_s: float = 0.0
    ) -> None:
        self.events = events
        self.requests: list[tuple[int, int, str | None]] = []
        self.delay_s = delay_s
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                after, limit = int(query["after"][0]), int(query["limit"][0])
                stub.requests.append((after, limit, self.headers.get("authorization")))
                page = [e for e in stub.events if e["position"] > after][:limit]
                if stub.delay_s:
                    time.sleep(stub.delay_s)
                head = max((e["position"] for e in stub.events), default=0)
                body = json.dumps(
                    {
                        "events": page,
                        "next_after": page[-1]["position"] if page else after,
                        "head_position": head,
                    }
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def feed() -> Iterator[StubFeed]:
    stub = StubFeed(scenario())
    yield stub
    stub.close()


def run_until_caught_up(settings: Settings, projected: Projected) -> FeedSource:
    source = FeedSource(
        settings,
        projected.projection,
        FeedProgress(projected.engine, settings.feed_url),
    )
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,))
    thread.start()
    try:
        assert source.caught_up.wait(20), "the feed source did not catch up"
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    return source


def test_the_feed_is_projected_page_by_page_and_its_position_stored(
    settings: Settings, projected: Projected, feed: StubFeed
) -> None:
    settings = settings.model_copy(
        update={
            "feed_url": feed.url,
            "feed_page_limit": 10,
            "feed_token": SecretStr("t0ken"),
        }
    )
    events = scenario()
    source = run_until_caught_up(settings, projected)

    assert source.applied == len(events)
    assert projected.rows(
        "SELECT last_position, events_applied FROM feed_position"
    ) == [(len(events), len(events))]
    assert feed.requests[0] == (0, 10, "Bearer t0ken")
    assert [after for after, _, _ in feed.requests[:3]] == [0, 10, 20]
    assert projected.rows(
        "SELECT status, count(*) FROM deals GROUP BY status ORDER BY status"
    ) == [("disqualified", 1), ("lost", 2), ("open", 2), ("won", 2)]


def test_a_restart_goes_on_from_the_stored_position_and_counts_nothing_twice(
    settings: Settings, projected: Projected, feed: StubFeed
) -> None:
    settings = settings.model_copy(update={"feed_url": feed.url})
    run_until_caught_up(settings, projected)
    visits = projected.rows("SELECT count(*) FROM stage_visits")

    # The feed hands out the last event again (at least once), then new ones.
    last = feed.events[-1]
    more = dict(last, position=last["position"] + 1)  # a redelivery, new position
    meeting = dict(
        last,
        event_id="late-meeting",
        type="meeting.held",
        data={},
        position=last["position"] + 2,
        stream_version=last["stream_version"] + 1,
    )
    feed.events.extend([more, meeting])
    feed.requests.clear()
    source = run_until_caught_up(settings, projected)

    assert feed.requests[0][0] == len(scenario())
    assert source.applied == 1
    assert projected.rows("SELECT count(*) FROM stage_visits") == visits
    assert projected.rows("SELECT meetings_held FROM deals WHERE deal_id = 'd7'") == [
        (1,)
    ]
    assert projected.rows(
        "SELECT events_applied, events_skipped FROM feed_position"
    ) == [(len(scenario()) + 1, 1)]


def test_an_unreachable_feed_is_retried_with_warnings(
    settings: Settings, projected: Projected, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = settings.model_copy(
        update={"feed_url": f"http://127.0.0.1:{port}", "feed_backoff_max_ms": 200}
    )
    source = FeedSource(
        settings,
        projected.projection,
        FeedProgress(projected.engine, settings.feed_url),
    )
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,))
    with caplog.at_level(logging.WARNING):
        thread.start()
        try:
            for _ in range(200):
                if any("feed unreachable" in r.getMessage() for r in caplog.records):
                    break
                time.sleep(0.05)
            stub = StubFeed(scenario(), port=port)
            try:
                assert source.caught_up.wait(20)
            finally:
                stub.close()
        finally:
            stop.set()
            thread.join(10)
    warning = next(r for r in caplog.records if "feed unreachable" in r.getMessage())
    assert warning.levelname == "WARNING" and "position=0" in warning.getMessage()
    assert source.applied == len(scenario())

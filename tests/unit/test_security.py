"""Webhook signatures, bearer tokens, the body size limit and the bind check."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from progression.security import (
    AuthenticationError,
    BodySizeLimit,
    ConfigurationError,
    PermissionDenied,
    Scope,
    SignatureError,
    WebhookSecret,
    parse_tokens,
    parse_webhook_secrets,
    refuse_open_bind,
    sign_dealledger,
    sign_hubspot_v3,
    verify_dealledger_signature,
    verify_hubspot_v3,
    verify_webhook,
)

NOW = 1_760_000_000.0
SECRET = "whsec-test-secret"
BODY = b'{"deal_id":"D-1","action":"demo_booked"}'


def reason_of(excinfo: pytest.ExceptionInfo[SignatureError]) -> str:
    return excinfo.value.reason


# --------------------------------------------------------------------------
# Our own scheme
# --------------------------------------------------------------------------


def test_a_signed_request_passes() -> None:
    header = sign_dealledger(BODY, SECRET, int(NOW))
    verify_dealledger_signature(header, BODY, SECRET, now=NOW)


def test_the_header_is_hmac_sha256_of_timestamp_dot_body() -> None:
    expected = hmac.new(
        SECRET.encode(), f"{int(NOW)}.".encode() + BODY, hashlib.sha256
    ).hexdigest()
    assert sign_dealledger(BODY, SECRET, int(NOW)) == f"t={int(NOW)},v1={expected}"


def test_a_one_byte_change_of_the_body_fails() -> None:
    header = sign_dealledger(BODY, SECRET, int(NOW))
    tampered = BODY.replace(b"D-1", b"D-2")
    with pytest.raises(SignatureError) as excinfo:
        verify_dealledger_signature(header, tampered, SECRET, now=NOW)
    assert reason_of(excinfo) == "signature does not match"


def test_a_wrong_secret_fails() -> None:
    header = sign_dealledger(BODY, "another-secret", int(NOW))
    with pytest.raises(SignatureError) as excinfo:
        verify_dealledger_signature(header, BODY, SECRET, now=NOW)
    assert reason_of(excinfo) == "signature does not match"


def test_a_stale_timestamp_fails() -> None:
    header = sign_dealledger(BODY, SECRET, int(NOW) - 301)
    with pytest.raises(SignatureError) as excinfo:
        verify_dealledger_signature(header, BODY, SECRET, now=NOW)
    assert reason_of(excinfo) == "timestamp older than 300 s"


def test_a_timestamp_within_the_tolerance_passes() -> None:
    header = sign_dealledger(BODY, SECRET, int(NOW) - 299)
    verify_dealledger_signature(header, BODY, SECRET, now=NOW)


def test_a_future_timestamp_fails() -> None:
    header = sign_dealledger(BODY, SECRET, int(NOW) + 301)
    with pytest.raises(SignatureError) as excinfo:
        verify_dealledger_signature(header, BODY, SECRET, now=NOW)
    assert reason_of(excinfo) == "timestamp more than 300 s in the future"


def test_the_tolerance_can_be_narrowed() -> None:
    header = sign_dealledger(BODY, SECRET, int(NOW) - 61)
    with pytest.raises(SignatureError) as excinfo:
        verify_dealledger_signature(header, BODY, SECRET, now=NOW, tolerance_s=60)
    assert reason_of(excinfo) == "timestamp older than 60 s"


@pytest.mark.parametrize("header", [None, "", "   "])
def test_a_missing_header_fails(header: str | None) -> None:
    with pytest.raises(SignatureError) as excinfo:
        verify_dealledger_signature(header, BODY, SECRET, now=NOW)
    assert reason_of(excinfo) == "signature header missing"


@pytest.mark.parametrize(
    "header",
    [
        "v1=" + "a" * 64,
        f"t={int(NOW)}",
        f"t=soon,v1={'a' * 64}",
        f"t={int(NOW)},v1=not-hex",
        f"t={int(NOW)},t={int(NOW)},v1={'a' * 64}",
        f"t={int(NOW)};v1={'a' * 64}",
        "garbage",
    ],
)
def test_a_malformed_header_fails(header: str) -> None:
    with pytest.raises(SignatureError) as excinfo:
        verify_dealledger_signature(header, BODY, SECRET, now=NOW)
    assert reason_of(excinfo).startswith("malformed header: ")


def test_during_rotation_either_secret_passes() -> None:
    timestamp = int(NOW)
    old = sign_dealledger(BODY, "old-secret", timestamp).split(",")[1]
    new = sign_dealledger(BODY, "new-secret", timestamp).split(",")[1]
    header = f"t={timestamp},{old},{new}"
    verify_dealledger_signature(header, BODY, "old-secret", now=NOW)
    verify_dealledger_signature(header, BODY, "new-secret", now=NOW)
    with pytest.raises(SignatureError) as excinfo:
        verify_dealledger_signature(header, BODY, "third-secret", now=NOW)
    assert reason_of(excinfo) == "signature does not match"


# --------------------------------------------------------------------------
# HubSpot v3
# --------------------------------------------------------------------------

HUBSPOT_SECRET = "a1b2c3d4-client-secret"
HUBSPOT_URL = (
    "https://hooks.example.com/webhooks/hubspot"
    "?since=2025-10-09T08%3A00%3A00Z&owner=ops%40example.com"
)
# The same URL with %3A and %40 decoded, written out by hand.
HUBSPOT_URL_AS_SIGNED = (
    "https://hooks.example.com/webhooks/hubspot"
    "?since=2025-10-09T08:00:00Z&owner=ops@example.com"
)
HUBSPOT_BODY = b'[{"objectId":123,"subscriptionType":"deal.propertyChange"}]'
HUBSPOT_TIMESTAMP = str(int(NOW * 1000))


def known_hubspot_signature(uri_as_signed: str) -> str:
    source = "POST" + uri_as_signed + HUBSPOT_BODY.decode() + HUBSPOT_TIMESTAMP
    digest = hmac.new(
        HUBSPOT_SECRET.encode("utf-8"), source.encode("utf-8"), hashlib.sha256
    ).digest()
    return base64.b64encode(digest).decode()


def test_hubspot_v3_known_vector_with_encoded_colons_in_the_query() -> None:
    signature = known_hubspot_signature(HUBSPOT_URL_AS_SIGNED)
    verify_hubspot_v3(
        signature,
        HUBSPOT_TIMESTAMP,
        method="POST",
        url=HUBSPOT_URL,
        body=HUBSPOT_BODY,
        secret=HUBSPOT_SECRET,
        now=NOW,
    )
    assert (
        sign_hubspot_v3(
            method="POST",
            url=HUBSPOT_URL,
            body=HUBSPOT_BODY,
            secret=HUBSPOT_SECRET,
            timestamp=HUBSPOT_TIMESTAMP,
        )
        == signature
    )


def test_hubspot_v3_leaves_escapes_outside_the_list_encoded() -> None:
    url = "https://hooks.example.com/hubspot?name=Ada%20Lovelace&pct=50%25"
    signature = known_hubspot_signature(url)
    verify_hubspot_v3(
        signature,
        HUBSPOT_TIMESTAMP,
        method="POST",
        url=url,
        body=HUBSPOT_BODY,
        secret=HUBSPOT_SECRET,
        now=NOW,
    )


def test_hubspot_v3_a_changed_body_fails() -> None:
    signature = known_hubspot_signature(HUBSPOT_URL_AS_SIGNED)
    with pytest.raises(SignatureError) as excinfo:
        verify_hubspot_v3(
            signature,
            HUBSPOT_TIMESTAMP,
            method="POST",
            url=HUBSPOT_URL,
            body=HUBSPOT_BODY + b" ",
            secret=HUBSPOT_SECRET,
            now=NOW,
        )
    assert reason_of(excinfo) == "signature does not match"


def test_hubspot_v3_timestamp_is_milliseconds_and_stale_requests_fail() -> None:
    stale = str(int((NOW - 301) * 1000))
    signature = sign_hubspot_v3(
        method="POST",
        url=HUBSPOT_URL,
        body=HUBSPOT_BODY,
        secret=HUBSPOT_SECRET,
        timestamp=stale,
    )
    with pytest.raises(SignatureError) as excinfo:
        verify_hubspot_v3(
            signature,
            stale,
            method="POST",
            url=HUBSPOT_URL,
            body=HUBSPOT_BODY,
            secret=HUBSPOT_SECRET,
            now=NOW,
        )
    assert reason_of(excinfo) == "timestamp older than 300 s"


@pytest.mark.parametrize(
    ("signature", "timestamp", "reason"),
    [
        (None, HUBSPOT_TIMESTAMP, "signature header missing"),
        ("c2lnbmF0dXJl", None, "timestamp header missing"),
    ],
)
def test_hubspot_v3_missing_headers_fail(
    signature: str | None, timestamp: str | None, reason: str
) -> None:
    with pytest.raises(SignatureError) as excinfo:
        verify_hubspot_v3(
            signature,
            timestamp,
            method="POST",
            url=HUBSPOT_URL,
            body=HUBSPOT_BODY,
            secret=HUBSPOT_SECRET,
            now=NOW,
        )
    assert reason_of(excinfo) == reason


def test_hubspot_v3_a_malformed_timestamp_fails() -> None:
    with pytest.raises(SignatureError) as excinfo:
        verify_hubspot_v3(
            "c2lnbmF0dXJl",
            "yesterday",
            method="POST",
            url=HUBSPOT_URL,
            body=HUBSPOT_BODY,
            secret=HUBSPOT_SECRET,
            now=NOW,
        )
    assert reason_of(excinfo).startswith("malformed header: ")


# --------------------------------------------------------------------------
# Webhook secrets setting and dispatch
# --------------------------------------------------------------------------


def test_webhook_secrets_parse_with_colons_inside_a_secret() -> None:
    secrets = parse_webhook_secrets(
        "hubspot:hubspot-v3:s3cret, salesforce:dealledger:other:with:colons"
    )
    assert secrets == {
        "hubspot": WebhookSecret("hubspot", "hubspot-v3", "s3cret"),
        "salesforce": WebhookSecret("salesforce", "dealledger", "other:with:colons"),
    }
    assert "other" not in repr(secrets["salesforce"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hubspot:hubspot-v3:ok,salesforce-only-a-secret", "entry 2: expected"),
        ("hubspot:hubspot-v2:topsecret", "entry 1: the scheme must be one of"),
        ("hubspot:hubspot-v3:", "entry 1: the secret is empty"),
        ("a:dealledger:x,a:dealledger:y", "entry 2: source 'a' is already"),
    ],
)
def test_webhook_secret_errors_name_the_entry_not_the_secret(
    text: str, message: str
) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_webhook_secrets(text)
    assert message in str(excinfo.value)
    for secret in ("topsecret", "salesforce-only-a-secret"):
        assert secret not in str(excinfo.value)


def test_verify_webhook_dispatches_on_the_scheme_with_any_header_case() -> None:
    ours = WebhookSecret("salesforce", "dealledger", SECRET)
    header = sign_dealledger(BODY, SECRET, int(NOW))
    for headers in (
        {"X-Dealledger-Signature": header},
        Headers({"x-dealledger-signature": header}),
    ):
        verify_webhook(
            ours, headers=headers, method="POST", url="http://x/", body=BODY, now=NOW
        )

    theirs = WebhookSecret("hubspot", "hubspot-v3", HUBSPOT_SECRET)
    signature = known_hubspot_signature(HUBSPOT_URL_AS_SIGNED)
    verify_webhook(
        theirs,
        headers={
            "X-HubSpot-Signature-v3": signature,
            "X-HubSpot-Request-Timestamp": HUBSPOT_TIMESTAMP,
        },
        method="POST",
        url=HUBSPOT_URL,
        body=HUBSPOT_BODY,
        now=NOW,
    )


def test_verify_webhook_refuses_a_request_signed_for_the_other_scheme() -> None:
    theirs = WebhookSecret("hubspot", "hubspot-v3", SECRET)
    with pytest.raises(SignatureError) as excinfo:
        verify_webhook(
            theirs,
            headers={"X-Dealledger-Signature": sign_dealledger(BODY, SECRET, 1)},
            method="POST",
            url="http://x/",
            body=BODY,
            now=NOW,
        )
    assert reason_of(excinfo) == "signature header missing"


# --------------------------------------------------------------------------
# Bearer tokens
# --------------------------------------------------------------------------

WRITER_TOKEN = "writer-token-0123456789"
OPS_TOKEN = "ops-token-abcdefghijkl"
TOKENS = f"crm={WRITER_TOKEN}=events:write read; oncall={OPS_TOKEN}=ops"


def test_a_token_with_the_scope_is_authenticated_by_name() -> None:
    table = parse_tokens(TOKENS)
    assert table.authenticate(f"Bearer {WRITER_TOKEN}", Scope.EVENTS_WRITE) == "crm"
    assert table.authenticate(f"bearer {WRITER_TOKEN}", Scope.READ) == "crm"
    assert table.authenticate(f"Bearer {OPS_TOKEN}", Scope.OPS) == "oncall"


def test_a_write_token_is_refused_on_ops() -> None:
    table = parse_tokens(TOKENS)
    with pytest.raises(PermissionDenied) as excinfo:
        table.authenticate(f"Bearer {WRITER_TOKEN}", Scope.OPS)
    assert "ops" in excinfo.value.reason


def test_ops_does_not_imply_read_or_write() -> None:
    table = parse_tokens(TOKENS)
    for scope in (Scope.READ, Scope.EVENTS_WRITE):
        with pytest.raises(PermissionDenied):
            table.authenticate(f"Bearer {OPS_TOKEN}", scope)


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "authorization header missing"),
        ("", "authorization header missing"),
        ("Bearer unknown-token-000000000", "unknown token"),
        (f"Basic {WRITER_TOKEN}", "authorization is not a Bearer token"),
        ("Bearer ", "malformed Bearer token"),
        (f"Bearer {WRITER_TOKEN} extra", "malformed Bearer token"),
    ],
)
def test_missing_malformed_or_unknown_tokens_are_not_authenticated(
    authorization: str | None, reason: str
) -> None:
    table = parse_tokens(TOKENS)
    with pytest.raises(AuthenticationError) as excinfo:
        table.authenticate(authorization, Scope.READ)
    assert excinfo.value.reason == reason


def test_the_table_does_not_show_tokens() -> None:
    table = parse_tokens(TOKENS)
    assert WRITER_TOKEN not in repr(table)
    assert WRITER_TOKEN not in repr(vars(table))
    assert table.names == ("crm", "oncall")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"crm={WRITER_TOKEN}=read;ops={OPS_TOKEN}", "token entry 2: expected"),
        ("crm=short=read", "token entry 1 (crm): the token is shorter than 16"),
        (
            f"crm={WRITER_TOKEN}=read write",
            "token entry 1 (crm): scope 2 is unknown; "
            "valid scopes are events:write, read, ops",
        ),
        (f"crm={WRITER_TOKEN}=", "token entry 1 (crm): no scope given"),
        (
            f"crm={WRITER_TOKEN}=read;crm={OPS_TOKEN}=ops",
            "token entry 2 (crm): the name is already used by entry 1",
        ),
        (
            f"a={WRITER_TOKEN}=read;b={WRITER_TOKEN}=ops",
            "token entry 2 (b): the token is the same as entry 1's",
        ),
    ],
)
def test_token_setting_errors_name_the_entry(text: str, message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_tokens(text)
    assert message in str(excinfo.value)
    assert WRITER_TOKEN not in str(excinfo.value)


def test_a_token_may_contain_equals_signs() -> None:
    token = "YWJjZGVmZ2hpamtsbW5vcA=="
    table = parse_tokens(f"ci={token}=read")
    assert table.authenticate(f"Bearer {token}", Scope.READ) == "ci"


# --------------------------------------------------------------------------
# Body size limit
# --------------------------------------------------------------------------

LIMIT = 64
PROBLEM = {
    "type": "https://dealledger.dev/problems/body-too-large",
    "title": "Request body too large",
    "status": 413,
    "detail": f"the body is larger than {LIMIT} bytes",
}


async def echo_length(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"received": len(body)})


APP = BodySizeLimit(
    Starlette(routes=[Route("/events", echo_length, methods=["POST"])]),
    max_bytes=LIMIT,
)


async def chunks(total: int, size: int = 16) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        chunk = b"x" * min(size, total - sent)
        sent += len(chunk)
        yield chunk


def request(
    method: str, path: str, content: bytes | AsyncIterator[bytes] | None = None
) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=APP)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver"
        ) as client:
            return await client.request(method, path, content=content)

    return asyncio.run(go())


def test_a_body_under_the_limit_reaches_the_app() -> None:
    response = request("POST", "/events", b"x" * LIMIT)
    assert response.status_code == 200
    assert response.json() == {"received": LIMIT}


def test_a_streamed_body_under_the_limit_reaches_the_app() -> None:
    response = request("POST", "/events", chunks(LIMIT))
    assert "content-length" not in response.request.headers
    assert response.status_code == 200
    assert response.json() == {"received": LIMIT}


def test_a_content_length_over_the_limit_gets_413_problem() -> None:
    response = request("POST", "/events", b"x" * (LIMIT + 1))
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == PROBLEM


def test_a_streamed_body_over_the_limit_gets_413_problem() -> None:
    response = request("POST", "/events", chunks(LIMIT * 4))
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == PROBLEM


def test_requests_without_a_large_body_are_untouched() -> None:
    assert request("GET", "/events").status_code == 405
    assert request("POST", "/elsewhere", b"x").status_code == 404


# --------------------------------------------------------------------------
# Bind check
# --------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_an_open_bind_without_credentials_is_refused(host: str) -> None:
    with pytest.raises(ConfigurationError, match="without credentials"):
        refuse_open_bind(host, credentials_configured=False)


def test_an_open_bind_with_credentials_is_allowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="progression.security"):
        refuse_open_bind("0.0.0.0", credentials_configured=True)
    assert caplog.records == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_loopback_without_credentials_starts_with_a_warning(
    host: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="progression.security"):
        refuse_open_bind(host, credentials_configured=False)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "unauthenticated requests on loopback only" in record.getMessage()
    assert f"host={host}" in record.getMessage()


def test_configuration_error_is_a_value_error() -> None:
    assert issubclass(ConfigurationError, ValueError)

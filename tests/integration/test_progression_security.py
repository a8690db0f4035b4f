"""Signatures and tokens on the progression API, over a real database."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest

from progression.errors import ConfigurationError
from progression.security import refuse_open_bind

from .progression_support import happy_path, progression_client

SECRETS = "crm:dealledger:crm-secret-123,hubspot:hubspot-v3:hub-secret-456"
TOKENS = (
    "writer=writer-token-0123456789=events:write;reader=reader-token-0123456789=read"
)


@pytest.fixture
def client(database_url: str):
    with progression_client(
        database_url, webhook_secrets=SECRETS, tokens=TOKENS
    ) as client:
        yield client


def own_signature(body: bytes, secret: str, t: int) -> str:
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256)
    return f"t={t},v1={mac.hexdigest()}"


def read(client, deal_id: str) -> int:
    return client.get(
        f"/v1/deals/{deal_id}",
        headers={"Authorization": "Bearer reader-token-0123456789"},
    ).status_code


def test_a_signed_webhook_is_accepted_and_an_unsigned_one_refused(client) -> None:
    body = json.dumps(happy_path("sec-1")[0]).encode()
    unsigned = client.post("/v1/events?source=crm", content=body)
    assert unsigned.status_code == 401
    assert read(client, "sec-1") == 404  # nothing was written

    tampered = client.post(
        "/v1/events?source=crm",
        content=body.replace(b"rep-1", b"rep-2"),
        headers={
            "X-Dealledger-Signature": own_signature(
                body, "crm-secret-123", int(time.time())
            )
        },
    )
    assert tampered.status_code == 401
    stale = client.post(
        "/v1/events?source=crm",
        content=body,
        headers={
            "X-Dealledger-Signature": own_signature(
                body, "crm-secret-123", int(time.time()) - 301
            )
        },
    )
    assert stale.status_code == 401
    assert read(client, "sec-1") == 404

    signed = client.post(
        "/v1/events",
        content=body,
        headers={
            "X-Dealledger-Source": "crm",
            "X-Dealledger-Signature": own_signature(
                body, "crm-secret-123", int(time.time())
            ),
        },
    )
    assert signed.status_code == 201
    assert read(client, "sec-1") == 200


def test_a_hubspot_v3_signature_is_checked_over_the_full_url(client) -> None:
    body = json.dumps(happy_path("sec-2")[0]).encode()
    url = "http://127.0.0.1:8000/v1/events?source=hubspot"
    stamp = str(int(time.time() * 1000))
    mac = hmac.new(
        b"hub-secret-456", f"POST{url}".encode() + body + stamp.encode(), hashlib.sha256
    )
    headers = {
        "X-HubSpot-Signature-v3": base64.b64encode(mac.digest()).decode(),
        "X-HubSpot-Request-Timestamp": stamp,
    }
    assert client.post(url, content=body, headers=headers).status_code == 201
    other = url.replace("source=hubspot", "source=hubspot&x=1")
    assert client.post(other, content=body, headers=headers).status_code == 401


def test_tokens_carry_scopes(client) -> None:
    item = happy_path("sec-3")[0]
    anonymous = client.post("/v1/events", json=item)
    assert anonymous.status_code == 401
    reader = client.post(
        "/v1/events",
        json=item,
        headers={"Authorization": "Bearer reader-token-0123456789"},
    )
    assert reader.status_code == 403
    writer = client.post(
        "/v1/events",
        json=item,
        headers={"Authorization": "Bearer writer-token-0123456789"},
    )
    assert writer.status_code == 201
    assert client.get("/v1/deals/sec-3").status_code == 401
    assert read(client, "sec-3") == 200
    assert (
        client.get(
            "/v1/feed", headers={"Authorization": "Bearer writer-token-0123456789"}
        ).status_code
        == 403
    )


def test_without_credentials_the_service_will_not_listen_beyond_loopback() -> None:
    with pytest.raises(ConfigurationError):
        refuse_open_bind("0.0.0.0", credentials_configured=False)
    refuse_open_bind("0.0.0.0", credentials_configured=True)


def test_with_only_webhook_secrets_nothing_can_be_read_anonymously(
    database_url: str,
) -> None:
    with progression_client(database_url, webhook_secrets=SECRETS) as client:
        assert client.get("/v1/feed").status_code == 401
        assert client.get("/v1/deals").status_code == 401
        assert client.get("/healthz").status_code == 200

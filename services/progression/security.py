"""Request security: webhook signatures, bearer tokens, body limits, bind checks.

The core is framework-agnostic: functions take header values, raw bodies and
the current time, and raise an error with a plain `reason` when a request must
be refused. `BodySizeLimit` is a pure ASGI middleware and needs no framework.

Webhook schemes:

* ``dealledger``: header ``X-Dealledger-Signature: t=<unix seconds>,v1=<hex>``
  where the hex value is HMAC-SHA256 of ``"<t>.<raw body>"``. Several ``v1=``
  values may be sent while a secret is rotated; any one matching passes.
* ``hubspot-v3``: HubSpot's ``X-HubSpot-Signature-v3`` (see `verify_hubspot_v3`).

Bearer tokens carry scopes (`Scope`); a token is kept in memory only as its
SHA-256 digest. No scope implies another one.
"""

from __future__ import annotations

__all__ = [
    "HUBSPOT_DECODED_ESCAPES",
    "AuthenticationError",
    "BodySizeLimit",
    "ConfigurationError",
    "PermissionDenied",
    "Scope",
    "SignatureError",
    "TokenTable",
    "WebhookSecret",
    "parse_tokens",
    "parse_webhook_secrets",
    "refuse_open_bind",
    "sign_dealledger",
    "sign_hubspot_v3",
    "verify_dealledger_signature",
    "verify_hubspot_v3",
    "verify_webhook",
]

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Literal, get_args

from progression.errors import ConfigurationError, ProgressionError

logger = logging.getLogger(__name__)

DEALLEDGER_SIGNATURE_HEADER = "x-dealledger-signature"
HUBSPOT_SIGNATURE_HEADER = "x-hubspot-signature-v3"
HUBSPOT_TIMESTAMP_HEADER = "x-hubspot-request-timestamp"

# More v1= values than this in one header is not rotation but an attempt to
# make the server compute many comparisons.
_MAX_V1_SIGNATURES = 8
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_UNIX_SECONDS = re.compile(r"[0-9]{1,12}")
_UNIX_MILLISECONDS = re.compile(r"[0-9]{1,15}")

WebhookScheme = Literal["dealledger", "hubspot-v3"]
_WEBHOOK_SCHEMES: dict[str, WebhookScheme] = {
    scheme: scheme for scheme in get_args(WebhookScheme)
}

# The percent-escapes HubSpot decodes in the request URI before signing (v3).
# Every other escape, %25 and %20 included, is signed as it was sent.
HUBSPOT_DECODED_ESCAPES: Mapping[str, str] = {
    "%3A": ":",
    "%2F": "/",
    "%3F": "?",
    "%40": "@",
    "%21": "!",
    "%24": "$",
    "%27": "'",
    "%28": "(",
    "%29": ")",
    "%2A": "*",
    "%2C": ",",
    "%3B": ";",
}
_HUBSPOT_ESCAPE = re.compile(
    "|".join(re.escape(escape) for escape in HUBSPOT_DECODED_ESCAPES),
    re.IGNORECASE,
)


class SignatureError(ProgressionError):
    """A webhook request is unsigned, stale, or signed with another secret."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class AuthenticationError(ProgressionError):
    """No usable bearer token: the caller is not known (HTTP 401)."""

    status_code: ClassVar[int] = 401

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class PermissionDenied(ProgressionError):
    """A known token lacks the scope the operation needs (HTTP 403)."""

    status_code: ClassVar[int] = 403

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# --------------------------------------------------------------------------
# Webhook signatures
# --------------------------------------------------------------------------


def _hmac_sha256(secret: str, message: bytes) -> bytes:
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).digest()


def _check_age(sent_at: float, now: float, tolerance_s: int) -> None:
    if sent_at < now - tolerance_s:
        raise SignatureError(f"timestamp older than {tolerance_s} s")
    if sent_at > now + tolerance_s:
        raise SignatureError(f"timestamp more than {tolerance_s} s in the future")


def sign_dealledger(body: bytes, secret: str, timestamp: int) -> str:
    """Return the full ``X-Dealledger-Signature`` value for `body` at `timestamp`."""
    if timestamp < 0:
        raise ValueError("timestamp must be unix seconds, not negative")
    digest = _hmac_sha256(secret, f"{timestamp}.".encode() + body)
    return f"t={timestamp},v1={digest.hex()}"


def _parse_dealledger_header(header: str) -> tuple[str, list[str]]:
    timestamps: list[str] = []
    signatures: list[str] = []
    for position, part in enumerate(header.split(","), start=1):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureError(f"malformed header: part {position} is not key=value")
        key, value = key.strip(), value.strip()
        if key == "t":
            timestamps.append(value)
        elif key == "v1":
            signatures.append(value)
        # Other keys (future schemes) are ignored, as rotation to them needs.
    if len(timestamps) != 1:
        raise SignatureError("malformed header: expected exactly one t= timestamp")
    if not _UNIX_SECONDS.fullmatch(timestamps[0]):
        raise SignatureError("malformed header: t is not unix seconds")
    if not signatures:
        raise SignatureError("malformed header: no v1= signature")
    if len(signatures) > _MAX_V1_SIGNATURES:
        raise SignatureError(
            f"malformed header: more than {_MAX_V1_SIGNATURES} v1= signatures"
        )
    for signature in signatures:
        if not _SHA256_HEX.fullmatch(signature):
            raise SignatureError("malformed header: v1 is not 64 hex digits")
    return timestamps[0], [signature.lower() for signature in signatures]


def verify_dealledger_signature(
    header: str | None,
    body: bytes,
    secret: str,
    *,
    now: float,
    tolerance_s: int = 300,
) -> None:
    """Accept `body` only if `header` signs it with `secret` within the tolerance.

    Timestamps more than `tolerance_s` seconds in the past or in the future are
    refused. Raises `SignatureError`; returns nothing when the request is good.
    """
    if header is None or not header.strip():
        raise SignatureError("signature header missing")
    timestamp, signatures = _parse_dealledger_header(header)
    _check_age(int(timestamp), now, tolerance_s)
    expected = _hmac_sha256(secret, f"{timestamp}.".encode() + body).hex()
    matched = False
    for signature in signatures:
        # Every candidate is compared, so timing does not tell which matched.
        matched |= hmac.compare_digest(expected, signature)
    if not matched:
        raise SignatureError("signature does not match")


def _hubspot_uri(url: str) -> str:
    return _HUBSPOT_ESCAPE.sub(
        lambda match: HUBSPOT_DECODED_ESCAPES[match.group(0).upper()], url
    )


def _hubspot_message(method: str, url: str, body: bytes, timestamp: str) -> bytes:
    # The UTF-8 of method + uri + body + timestamp; the body is used as received.
    return (
        method.upper().encode("utf-8")
        + _hubspot_uri(url).encode("utf-8")
        + body
        + timestamp.encode("utf-8")
    )


def sign_hubspot_v3(
    *, method: str, url: str, body: bytes, secret: str, timestamp: int | str
) -> str:
    """Return the ``X-HubSpot-Signature-v3`` value HubSpot would send.

    `timestamp` is the ``X-HubSpot-Request-Timestamp`` value (milliseconds).
    """
    message = _hubspot_message(method, url, body, str(timestamp))
    return base64.b64encode(_hmac_sha256(secret, message)).decode("ascii")


def verify_hubspot_v3(
    signature: str | None,
    timestamp: str | None,
    *,
    method: str,
    url: str,
    body: bytes,
    secret: str,
    now: float,
    tolerance_s: int = 300,
) -> None:
    """Accept a HubSpot webhook signed with the v3 scheme.

    The signature is base64 of HMAC-SHA256, keyed by the app's client secret,
    over the UTF-8 string ``method + uri + body + timestamp``: `url` is the
    full request URL (scheme, host, path, query) and `timestamp` the
    ``X-HubSpot-Request-Timestamp`` header, milliseconds since the epoch.

    As HubSpot documents, these percent-escapes in the URI are decoded before
    signing (in either letter case), and no others: %3A ``:``, %2F ``/``,
    %3F ``?``, %40 ``@``, %21 ``!``, %24 ``$``, %27 ``'``, %28 ``(``,
    %29 ``)``, %2A ``*``, %2C ``,``, %3B ``;`` (`HUBSPOT_DECODED_ESCAPES`).

    Requests older than `tolerance_s` (five minutes) are refused, and so are
    requests stamped that far in the future. Raises `SignatureError`.
    """
    if signature is None or not signature.strip():
        raise SignatureError("signature header missing")
    if timestamp is None or not timestamp.strip():
        raise SignatureError("timestamp header missing")
    timestamp = timestamp.strip()
    if not _UNIX_MILLISECONDS.fullmatch(timestamp):
        raise SignatureError(
            "malformed header: X-HubSpot-Request-Timestamp is not milliseconds"
        )
    _check_age(int(timestamp) / 1000, now, tolerance_s)
    expected = sign_hubspot_v3(
        method=method, url=url, body=body, secret=secret, timestamp=timestamp
    )
    if not hmac.compare_digest(
        expected.encode("ascii"), signature.strip().encode("utf-8")
    ):
        raise SignatureError("signature does not match")


@dataclass(frozen=True, slots=True)
class WebhookSecret:
    """The secret one webhook source signs with, and the scheme it uses."""

    source: str
    scheme: WebhookScheme
    secret: str = field(repr=False)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_webhook_secrets(text: str) -> dict[str, WebhookSecret]:
    """Parse ``source:scheme:secret`` entries separated by commas, by source.

    A secret may contain ``:`` (everything after the second colon is the
    secret) but not ``,``. Empty entries are skipped. A malformed entry raises
    `ConfigurationError` (a `ValueError`) naming the entry number and the
    rule it breaks; the entry's text is never repeated, as it holds a secret.
    """
    secrets: dict[str, WebhookSecret] = {}
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(text.split(","), start=1):
        entry = raw.strip()
        if not entry:
            continue
        parts = entry.split(":", 2)
        if len(parts) != 3:
            raise ConfigurationError(
                f"webhook secret entry {number}: expected source:scheme:secret"
            )
        source, scheme, secret = parts[0].strip(), parts[1].strip(), parts[2]
        if not _NAME.fullmatch(source):
            raise ConfigurationError(
                f"webhook secret entry {number}: the source must be letters, "
                "digits, '.', '_' or '-'"
            )
        known_scheme = _WEBHOOK_SCHEMES.get(scheme)
        if known_scheme is None:
            raise ConfigurationError(
                f"webhook secret entry {number}: the scheme must be one of "
                + ", ".join(_WEBHOOK_SCHEMES)
            )
        if not secret:
            raise ConfigurationError(
                f"webhook secret entry {number}: the secret is empty"
            )
        if source in first_seen:
            raise ConfigurationError(
                f"webhook secret entry {number}: source {source!r} is already "
                f"configured by entry {first_seen[source]}"
            )
        first_seen[source] = number
        secrets[source] = WebhookSecret(
            source=source,
            scheme=known_scheme,
            secret=secret,
        )
    return secrets


def _header_getter(headers: Mapping[str, str]) -> Callable[[str], str | None]:
    if isinstance(headers, dict):
        lowered = {key.lower(): value for key, value in headers.items()}
        return lowered.get
    # A case-insensitive mapping (Starlette's Headers) stores lower-case keys.
    return headers.get


def verify_webhook(
    secret: WebhookSecret,
    *,
    headers: Mapping[str, str],
    method: str,
    url: str,
    body: bytes,
    now: float,
    tolerance_s: int = 300,
) -> None:
    """Verify a webhook request with the scheme `secret` names.

    `headers` is looked up case-insensitively: a Starlette ``Headers`` or a
    plain ``dict`` both work. Raises `SignatureError`.
    """
    header = _header_getter(headers)
    try:
        if secret.scheme == "dealledger":
            verify_dealledger_signature(
                header(DEALLEDGER_SIGNATURE_HEADER),
                body,
                secret.secret,
                now=now,
                tolerance_s=tolerance_s,
            )
        else:
            verify_hubspot_v3(
                header(HUBSPOT_SIGNATURE_HEADER),
                header(HUBSPOT_TIMESTAMP_HEADER),
                method=method,
                url=url,
                body=body,
                secret=secret.secret,
                now=now,
                tolerance_s=tolerance_s,
            )
    except SignatureError as error:
        logger.info(
            'webhook_refused source=%s scheme=%s reason="%s"',
            secret.source,
            secret.scheme,
            error.reason,
        )
        raise


# --------------------------------------------------------------------------
# Bearer tokens
# --------------------------------------------------------------------------


class Scope(StrEnum):
    """What a bearer token may do. No scope implies another."""

    EVENTS_WRITE = "events:write"
    READ = "read"
    OPS = "ops"


_MIN_TOKEN_LENGTH = 16
_VALID_SCOPES = ", ".join(scope.value for scope in Scope)


@dataclass(frozen=True, slots=True)
class _Credential:
    name: str
    digest: bytes
    scopes: frozenset[Scope]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenTable:
    """Known bearer tokens by name, held only as SHA-256 digests."""

    def __init__(self, tokens: Iterable[tuple[str, str, Iterable[Scope]]] = ()) -> None:
        """Take ``(name, token, scopes)`` triples; the tokens are not kept."""
        self._credentials = tuple(
            _Credential(name=name, digest=_digest(token), scopes=frozenset(scopes))
            for name, token, scopes in tokens
        )

    def __len__(self) -> int:
        return len(self._credentials)

    def __repr__(self) -> str:
        return f"TokenTable(names={self.names!r})"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(credential.name for credential in self._credentials)

    def authenticate(self, authorization: str | None, required: Scope) -> str:
        """Return the name of the token in `authorization` if it has `required`.

        Raises `AuthenticationError` for a missing, malformed or unknown token
        and `PermissionDenied` for a known token without the scope.
        """
        if authorization is None or not authorization.strip():
            raise AuthenticationError("authorization header missing")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer":
            raise AuthenticationError("authorization is not a Bearer token")
        if not token or any(character.isspace() for character in token):
            raise AuthenticationError("malformed Bearer token")
        presented = _digest(token)
        found: _Credential | None = None
        for credential in self._credentials:
            # Compare with every entry: the time taken does not reveal which.
            if hmac.compare_digest(credential.digest, presented) and found is None:
                found = credential
        if found is None:
            logger.info('token_refused reason="unknown token"')
            raise AuthenticationError("unknown token")
        if required not in found.scopes:
            logger.info(
                'token_refused name=%s required=%s reason="scope missing"',
                found.name,
                required.value,
            )
            raise PermissionDenied(
                f"token {found.name!r} does not have the {required.value!r} scope"
            )
        return found.name


def parse_tokens(text: str) -> TokenTable:
    """Parse ``name=token=scope scope;name2=token2=scope`` into a `TokenTable`.

    Entries are separated by ``;``, fields by ``=`` and scopes by spaces. A
    token may contain ``=`` (the last ``=`` starts the scopes). Names are
    letters, digits, ``.``, ``_`` or ``-``; tokens are at least 16 characters
    without spaces. A malformed entry raises `ConfigurationError` (a
    `ValueError`) naming the entry; the token itself is never repeated.
    """
    triples: list[tuple[str, str, frozenset[Scope]]] = []
    names: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    for number, raw in enumerate(text.split(";"), start=1):
        entry = raw.strip()
        if not entry:
            continue
        name, _, rest = entry.partition("=")
        token, sep, scope_text = rest.rpartition("=")
        name, token = name.strip(), token.strip()
        if not sep or not token:
            raise ConfigurationError(
                f"token entry {number}: expected name=token=scope [scope ...]"
            )
        if not _NAME.fullmatch(name):
            raise ConfigurationError(
                f"token entry {number}: the name must be letters, digits, "
                "'.', '_' or '-'"
            )
        where = f"token entry {number} ({name})"
        if len(token) < _MIN_TOKEN_LENGTH:
            raise ConfigurationError(
                f"{where}: the token is shorter than {_MIN_TOKEN_LENGTH} characters"
            )
        if any(character.isspace() for character in token):
            raise ConfigurationError(f"{where}: the token contains whitespace")
        scope_names = scope_text.split()
        if not scope_names:
            raise ConfigurationError(
                f"{where}: no scope given; valid scopes are {_VALID_SCOPES}"
            )
        scopes: set[Scope] = set()
        for position, scope_name in enumerate(scope_names, start=1):
            try:
                scopes.add(Scope(scope_name))
            except ValueError:
                # Not echoed: a misplaced field could be the token itself.
                raise ConfigurationError(
                    f"{where}: scope {position} is unknown; "
                    f"valid scopes are {_VALID_SCOPES}"
                ) from None
        if name in names:
            raise ConfigurationError(
                f"{where}: the name is already used by entry {names[name]}"
            )
        digest = _digest(token)
        if digest in digests:
            raise ConfigurationError(
                f"{where}: the token is the same as entry {digests[digest]}'s"
            )
        names[name] = number
        digests[digest] = number
        triples.append((name, token, frozenset(scopes)))
    return TokenTable(triples)


# --------------------------------------------------------------------------
# Request body size
# --------------------------------------------------------------------------

_Message = MutableMapping[str, Any]
_ASGIScope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_ASGIScope, _Receive, _Send], Awaitable[None]]

BODY_TOO_LARGE_TYPE = "https://dealledger.dev/problems/body-too-large"


class _BodyState:
    __slots__ = ("exceeded", "received", "started")

    def __init__(self) -> None:
        self.received = 0
        self.exceeded = False
        self.started = False


class BodySizeLimit:
    """ASGI middleware refusing request bodies larger than `max_bytes` with 413.

    A declared ``Content-Length`` over the limit is refused before the
    application runs. A body without one (chunked or streamed) is counted as
    the application reads it: once over the limit the application is told the
    client disconnected, whatever it tries to send is dropped, and the client
    gets the 413 if no response had started. The body is never buffered here.
    """

    def __init__(self, app: _ASGIApp, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: _ASGIScope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            logger.info(
                "body_refused path=%s content_length=%d max_bytes=%d",
                scope.get("path", ""),
                declared,
                self.max_bytes,
            )
            await self._refuse(send)
            return

        state = _BodyState()

        async def limited_receive() -> _Message:
            if state.exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state.received += len(message.get("body", b""))
                if state.received > self.max_bytes:
                    state.exceeded = True
                    logger.info(
                        "body_refused path=%s received=%d max_bytes=%d",
                        scope.get("path", ""),
                        state.received,
                        self.max_bytes,
                    )
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: _Message) -> None:
            if state.exceeded and not state.started:
                return  # the 413 goes out instead
            if message["type"] == "http.response.start":
                state.started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state.exceeded or state.started:
                raise
            # The application was told the client left; its error is expected.
            logger.debug("body_refused_app_error path=%s", scope.get("path", ""))
        if state.exceeded and not state.started:
            await self._refuse(send)

    async def _refuse(self, send: _Send) -> None:
        body = json.dumps(
            {
                "type": BODY_TOO_LARGE_TYPE,
                "title": "Request body too large",
                "status": 413,
                "detail": f"the body is larger than {self.max_bytes} bytes",
            }
        ).encode("utf-8")
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode("ascii")),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _declared_length(scope: _ASGIScope) -> int | None:
    """The largest Content-Length the request declares, if a valid one."""
    lengths = [
        int(value)
        for key, value in scope.get("headers", ())
        if key.lower() == b"content-length" and value.strip().isdigit()
    ]
    return max(lengths) if lengths else None


# --------------------------------------------------------------------------
# Binding
# --------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name other than localhost: cannot be sure
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def refuse_open_bind(host: str, credentials_configured: bool) -> None:
    """Refuse to listen beyond loopback when no credentials are configured.

    Loopback is 127.0.0.0/8, ::1 and ``localhost``. Without credentials on a
    loopback address the service starts, with a warning that it accepts
    unauthenticated requests; on any other address `ConfigurationError`.
    """
    if credentials_configured:
        return
    if not _is_loopback(host):
        raise ConfigurationError(
            f"refusing to listen on {host!r} without credentials: configure "
            "API tokens, or bind to a loopback address (127.0.0.1, ::1, localhost)"
        )
    logger.warning(
        'unauthenticated_access host=%s detail="no credentials configured; '
        'the service accepts unauthenticated requests on loopback only"',
        host,
    )

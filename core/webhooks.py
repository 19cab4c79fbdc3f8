"""Webhooks, the parts without a database: the events, their payload, the signature, which
URLs may receive them, and the retry schedule. The rows and their state changes are in
`core/webhook_store.py`; the worker posts them (`worker/webhooks.py`).

Signature (Stripe's scheme): `Finetune-Signature: t=<unix seconds>,v1=<hex>` where `<hex>`
is HMAC-SHA256 keyed by the endpoint's secret over `f"{t}.".encode() + body`, the exact
bytes posted. The timestamp is signed so a captured delivery cannot be replayed later than
the receiver's tolerance; `verify` is the receiver's side (README: Webhooks).

Server-side request forgery: a webhook URL is a request the service makes on a tenant's
behalf, from inside its network. Only http(s), no credentials in the URL, and every address
its host resolves to must be public (not private, loopback, link-local, multicast, reserved
or unspecified, IPv4-mapped IPv6 included), unless WEBHOOK_ALLOW_PRIVATE. It is checked when
the URL is registered and again for each connection, on the address actually connected to
(a name that resolved to a public address once may resolve to 127.0.0.1 later).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

EVENTS = ("job.running", "job.succeeded", "job.failed", "job.canceled")
EVENT_OF_STATUS = {
    "running": "job.running",
    "succeeded": "job.succeeded",
    "failed": "job.failed",
    "canceled": "job.canceled",
}
SIGNATURE_HEADER = "Finetune-Signature"
DEFAULT_TOLERANCE_SECONDS = 300

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


class UrlRefused(ValueError):
    """The URL may not receive webhooks; the message says why and what would be accepted."""


def new_secret() -> str:
    return f"whsec_{secrets.token_urlsafe(32)}"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `Finetune-Signature` header value for `body` posted at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str,
    header: str,
    body: bytes,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """What a receiver checks: a `v1` signature of this body, made within `tolerance`."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body).rsplit("v1=", 1)[1]
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))


def backoff_seconds(tries: int, base: float, cap: float) -> float:
    """The wait after the `tries`-th failed try: base, 2*base, 4*base, ... at most `cap`."""
    return float(min(cap, base * 2 ** max(0, tries - 1)))


def is_public(address: IPAddress) -> bool:
    """Reachable on the internet: what a webhook may connect to unless private is allowed."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:  # fec0::/10, deprecated but still routed inside some sites
            return False
        # An IPv4 address carried inside IPv6 (mapped, 6to4, Teredo) is judged as itself.
        inner = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if inner is not None:
            return is_public(inner)
    return (
        address.is_global
        and not address.is_multicast
        and not address.is_reserved
        and not address.is_unspecified
    )


def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (both families), as the connection will see them."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlRefused(f"the webhook host {host!r} does not resolve ({exc})") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def checked_addresses(
    host: str, port: int, allow_private: bool, resolver: Resolver = resolve
) -> list[str]:
    """The addresses to connect to for `host`; UrlRefused if any of them is not public (and
    private ones are not allowed): a host with one private address is refused whole."""
    try:
        literal: IPAddress | None = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        literal = None
    found = [str(literal)] if literal is not None else resolver(host, port)
    if not found:
        raise UrlRefused(f"the webhook host {host!r} resolves to no address")
    if allow_private:
        return found
    for text in found:
        address = ipaddress.ip_address(text.split("%")[0])
        if not is_public(address):
            # A name's private address is not said: it would map the internal network.
            what = str(address) if literal is not None else f"{host!r} (it resolves to one)"
            raise UrlRefused(
                f"webhooks may not be sent to {what}: private, loopback, link-local, "
                "multicast and reserved addresses are refused; use a public address "
                "(an operator may allow private ones with WEBHOOK_ALLOW_PRIVATE=true)"
            )
    return found


def parse_url(url: str) -> tuple[str, int]:
    """(host, port) of a URL that may receive webhooks as far as its text goes: http(s), a
    host, no credentials. UrlRefused otherwise."""
    if len(url) > 2048:
        raise UrlRefused("the webhook URL is longer than 2048 characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise UrlRefused("the webhook URL holds spaces or control characters; percent-encode them")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(f"the webhook URL {url!r} is not a valid URL ({exc})") from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise UrlRefused(f"the webhook URL must be http:// or https://, not {parts.scheme!r}")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused(
            "the webhook URL may not carry credentials (user:password@); the signature "
            "authenticates the service to your endpoint"
        )
    if not parts.hostname:
        raise UrlRefused(f"the webhook URL {url!r} has no host")
    return parts.hostname, port or (443 if parts.scheme.lower() == "https" else 80)


def check_url(url: str, allow_private: bool, resolver: Resolver = resolve) -> None:
    """UrlRefused unless `url` may receive webhooks (see the module docstring)."""
    host, port = parse_url(url)
    checked_addresses(host, port, allow_private, resolver)


def event_payload(job: Any, event: str, event_id: str, at: float | None = None) -> dict[str, Any]:
    """The JSON posted for `event` of `job` (a Job row), as of now. The job is summarized,
    not dumped: the receiver reads the rest with GET /v1/jobs/{id}."""
    result = job.result or {}
    error = {"code": job.error_code, "message": job.error_message} if job.error_code else None
    return {
        "id": event_id,
        "type": event,
        "created": int(time.time() if at is None else at),
        "data": {
            "job": {
                "id": job.id,
                "status": job.status,
                "dataset_id": job.dataset_id,
                "attempts": job.attempts,
                "best_metrics": job.best_metrics,
                "error": error,
                "model_available": bool(result.get("bundle_key")),
            }
        },
    }

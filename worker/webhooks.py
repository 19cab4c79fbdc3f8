"""One try of a webhook delivery (the `finetune.deliver_webhook` task, on the light queue):
claim it, post the signed event, record the answer, and schedule the next try with its
backoff (core/webhook_store.py has the states; core/webhooks.py the signature and the URL
rules).

The connection is made by `PublicOnlyBackend`: it resolves the host itself, refuses the
whole URL if any address is not public (unless WEBHOOK_ALLOW_PRIVATE), and connects to an
address it checked. So a name that resolved to a public address when it was registered and
to 127.0.0.1 now (DNS rebinding) is refused at the connection, not after it. Redirects are
not followed (a 3xx is a failed try), environment proxies are ignored, the timeout is
WEBHOOK_TIMEOUT_SECONDS for the whole try (connect, send, the answer's status and headers;
`DeadlineStream`), and the answer's body is never read.
"""

from __future__ import annotations

import json
import logging
import time
import typing

import httpcore
import httpx

from core import queue, webhook_store, webhooks
from core.db import session_scope
from core.models import WebhookDelivery, WebhookEndpoint
from core.settings import Settings, get_settings

log = logging.getLogger(__name__)

USER_AGENT = "finetune-webhooks/1"


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read, write and TLS handshake gets only what is left of one
    deadline: a server that drips its answer a byte at a time, each inside the per-read
    timeout, still ends the try at WEBHOOK_TIMEOUT_SECONDS."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float):
        self.inner = inner
        self.deadline = deadline

    def _left(self, timeout: float | None) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout("the webhook's whole try ran past WEBHOOK_TIMEOUT_SECONDS")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, self._left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, self._left(timeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self,
        ssl_context: typing.Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        tls = self.inner.start_tls(ssl_context, server_hostname, self._left(timeout))
        return DeadlineStream(tls, self.deadline)

    def get_extra_info(self, info: str) -> typing.Any:
        return self.inner.get_extra_info(info)


class PublicOnlyBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, connecting only to addresses `checked_addresses` allows, each
    connection bounded by one overall deadline (`DeadlineStream`) from `total` seconds."""

    def __init__(self, allow_private: bool, total: float | None = None):
        self.allow_private = allow_private
        self.inner = httpcore.SyncBackend()
        self.deadline = None if total is None else time.monotonic() + total

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = webhooks.checked_addresses(host, port, self.allow_private)
        except webhooks.UrlRefused as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        error: Exception | None = None
        for address in addresses:
            if self.deadline is not None:  # each address gets only what is left
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise httpcore.ConnectTimeout(
                        "the webhook's whole try ran past WEBHOOK_TIMEOUT_SECONDS"
                    )
                timeout = left if timeout is None else min(timeout, left)
            try:
                stream = self.inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
                return stream if self.deadline is None else DeadlineStream(stream, self.deadline)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("webhooks are never sent to a unix socket")

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def client(settings: Settings) -> httpx.Client:
    transport = httpx.HTTPTransport(trust_env=False)
    # httpx takes no network backend; its pool is httpcore's, which does.
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=1,
        network_backend=PublicOnlyBackend(
            settings.webhook_allow_private, total=settings.webhook_timeout_seconds
        ),
    )
    return httpx.Client(
        transport=transport,
        trust_env=False,
        follow_redirects=False,
        timeout=settings.webhook_timeout_seconds,
    )


def body_of(payload: dict[str, typing.Any]) -> bytes:
    """The exact bytes posted and signed."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def post(
    settings: Settings, url: str, secret: str, delivery: WebhookDelivery
) -> tuple[int | None, str | None]:
    """Post the signed event: (the status code, or None; an error, or None for a 2xx)."""
    try:
        webhooks.parse_url(url)  # the addresses are checked by the connection itself
    except webhooks.UrlRefused as exc:
        return None, str(exc)
    body = body_of(delivery.payload)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        webhooks.SIGNATURE_HEADER: webhooks.signature(secret, int(time.time()), body),
        "Finetune-Event": delivery.event,
        "Finetune-Event-Id": delivery.event_id,
        "Finetune-Delivery": delivery.id,
    }
    try:
        with client(settings) as http, http.stream("POST", url, content=body, headers=headers) as r:
            code = r.status_code
    except httpx.TimeoutException as exc:
        limit = settings.webhook_timeout_seconds
        return None, f"{type(exc).__name__}: no answer within {limit:g}s (WEBHOOK_TIMEOUT_SECONDS)"
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:1000]
    if 200 <= code < 300:
        return code, None
    if 300 <= code < 400:
        return code, f"HTTP {code}: redirects are not followed; register the final URL"
    return code, f"HTTP {code}"


def deliver(delivery_id: str, settings: Settings | None = None) -> str:
    """One try; returns what became of the delivery ("skipped", "succeeded", "retrying",
    "failed")."""
    settings = settings or get_settings()
    with session_scope(settings) as s:
        if not webhook_store.claim(s, delivery_id, settings):
            return "skipped"
        delivery = s.get(WebhookDelivery, delivery_id)
        assert delivery is not None
        endpoint = s.get(WebhookEndpoint, delivery.endpoint_id)
        assert endpoint is not None
        s.expunge_all()
    code: int | None = None
    error: str | None = "the webhook endpoint was deleted"
    final = endpoint.deleted_at is not None
    if not final:
        try:
            code, error = post(settings, endpoint.url, endpoint.secret, delivery)
        except Exception as exc:  # noqa: BLE001 - recorded as the try's error, retried
            log.warning("delivery %s: unexpected error", delivery_id, exc_info=True)
            error = f"{type(exc).__name__}: {exc}"[:1000]
    with session_scope(settings) as s:
        countdown = webhook_store.record(s, delivery_id, settings, code, error, final)
    if countdown is not None:
        log.info("delivery %s: %s; next try in %.1fs", delivery_id, error, countdown)
        queue.send_webhook(delivery_id, settings, countdown=countdown)
        return "retrying"
    if error is None:
        return "succeeded"
    log.warning("delivery %s failed for good: %s", delivery_id, error)
    return "failed"

"""Webhooks without a database: the signature, which URLs and addresses are refused (and
the connection's own check), the retry schedule, and what a post does with 3xx answers."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import threading
import time

import httpcore
import pytest

from core import webhooks
from core.models import WebhookDelivery
from core.settings import Settings
from core.webhooks import UrlRefused, backoff_seconds, check_url, signature, verify


def test_the_signature_is_hmac_sha256_over_the_timestamp_and_the_body():
    body = b'{"id":"evt_1","type":"job.succeeded"}'
    header = signature("whsec_abc", 1700000000, body)
    expected = hmac.new(b"whsec_abc", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify("whsec_abc", header, body, now=1700000010)


@pytest.mark.parametrize(
    "secret, body, now, header_of",
    [
        ("whsec_other", b"{}", 1700000000, None),  # another endpoint's secret
        ("whsec_abc", b'{"x":1}', 1700000000, None),  # the body was changed
        ("whsec_abc", b"{}", 1700000000 + 301, None),  # replayed after the tolerance
        ("whsec_abc", b"{}", 1700000000, "v1=00"),  # no timestamp
        ("whsec_abc", b"{}", 1700000000, "t=1700000000"),  # no signature
        ("whsec_abc", b"{}", 1700000000, "t=soon,v1=00"),  # a timestamp that is no number
    ],
)
def test_a_wrong_secret_body_age_or_header_fails_verification(secret, body, now, header_of):
    header = header_of or signature("whsec_abc", 1700000000, b"{}")
    assert not verify(secret, header, body, now=now)


def test_a_header_with_several_signatures_verifies_with_any_one():
    body = b"{}"
    good = signature("whsec_abc", 1700000000, body).split(",")[1]
    assert verify("whsec_abc", f"t=1700000000,v1=deadbeef,{good}", body, now=1700000000)


def test_the_backoff_doubles_from_its_base_up_to_its_cap():
    waits = [backoff_seconds(n, base=10, cap=300) for n in range(1, 8)]
    assert waits == [10, 20, 40, 80, 160, 300, 300]


@pytest.mark.parametrize(
    "url, said",
    [
        ("ftp://example.com/hook", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("gopher://example.com/", "http:// or https://"),
        ("https://user:pw@example.com/hook", "credentials"),
        ("https://token@example.com/hook", "credentials"),
        ("https:///hook", "no host"),
        ("https://example.com:99999/", "not a valid URL"),
        ("https://example.com/" + "a" * 2048, "longer than 2048"),
    ],
)
def test_urls_that_are_not_plain_http_are_refused_saying_why(url, said):
    with pytest.raises(UrlRefused, match=said):
        check_url(url, allow_private=True, resolver=lambda h, p: ["93.184.215.14"])


PRIVATE = [
    "127.0.0.1",
    "127.8.8.8",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # the cloud metadata service
    "0.0.0.0",
    "100.64.0.1",  # carrier-grade NAT
    "224.0.0.1",  # multicast
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "::ffff:127.0.0.1",  # IPv4-mapped loopback
    "2002:7f00:1::",  # 6to4 around 127.0.0.1
    "2002:a00:7::",  # 6to4 around 10.0.0.7
    "fec0::1",  # site-local
    "::ffff:10.0.0.1",
    "2001:db8::1",  # documentation
]


@pytest.mark.parametrize("address", PRIVATE)
def test_private_loopback_link_local_and_reserved_literals_are_refused(address):
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(UrlRefused, match="WEBHOOK_ALLOW_PRIVATE"):
        check_url(f"http://{host}:8080/hook", allow_private=False)
    check_url(f"http://{host}:8080/hook", allow_private=True)  # the operator's choice


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_are_accepted(address):
    host = f"[{address}]" if ":" in address else address
    check_url(f"https://{host}/hook", allow_private=False)


def test_a_name_that_resolves_to_a_private_address_is_refused_without_naming_the_address():
    """Saying which private address a name resolves to would map the internal network."""
    with pytest.raises(UrlRefused, match=r"'hooks\.example\.com' \(it resolves to one\)") as got:
        check_url(
            "https://hooks.example.com/x",
            False,
            resolver=lambda h, p: ["93.184.215.14", "10.0.0.7"],
        )
    assert "10.0.0.7" not in str(got.value)
    with pytest.raises(UrlRefused, match="resolves to one") as got:
        check_url("https://hooks.example.com/x", False, resolver=lambda h, p: ["fd00::7"])
    assert "fd00" not in str(got.value)
    with pytest.raises(UrlRefused, match="fd00::7"):  # a literal is the caller's own text
        check_url("https://[fd00::7]/x", False)
    check_url("https://hooks.example.com/x", False, resolver=lambda h, p: ["93.184.215.14"])


@pytest.mark.parametrize(
    "url", ["http://localhost:8000/", "http://2130706433/", "http://0x7f000001/", "http://0/"]
)
def test_names_and_odd_notations_for_loopback_are_refused_once_resolved(url):
    with pytest.raises(UrlRefused):
        check_url(url, allow_private=False)


def test_a_name_that_does_not_resolve_is_refused():
    with pytest.raises(UrlRefused, match="does not resolve"):
        check_url("https://no-such-host.invalid/hook", allow_private=False)


def test_the_connection_itself_refuses_a_loopback_address():
    """What stops DNS rebinding: the address connected to is the address checked."""
    from worker.webhooks import PublicOnlyBackend

    with pytest.raises(httpcore.ConnectError, match="'localhost' \\(it resolves to one\\)"):
        PublicOnlyBackend(allow_private=False).connect_tcp("localhost", 80, timeout=1)


class Receiver(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []
    status = 200

    def do_POST(self) -> None:  # noqa: N802
        self.hits.append(self.path)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(self.status)
        self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def receiver():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    Receiver.hits = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def delivery() -> WebhookDelivery:
    payload = {"id": "evt_x", "type": "job.succeeded", "data": {}}
    return WebhookDelivery(
        id="whd_x", event="job.succeeded", event_id="evt_x", payload=payload, attempt_log=[]
    )


def test_a_post_to_loopback_is_refused_before_connecting_unless_allowed(receiver):
    from worker.webhooks import post

    code, error = post(Settings(webhook_allow_private=False), receiver + "/h", "s", delivery())
    assert code is None and "127.0.0.1" in error and "WEBHOOK_ALLOW_PRIVATE" in error
    assert Receiver.hits == []
    code, error = post(Settings(webhook_allow_private=True), receiver + "/h", "s", delivery())
    assert (code, error) == (200, None) and Receiver.hits == ["/h"]


def test_a_redirect_is_a_failed_try_and_is_not_followed(receiver):
    from worker.webhooks import post

    Receiver.status = 302
    try:
        code, error = post(Settings(webhook_allow_private=True), receiver + "/h", "s", delivery())
    finally:
        Receiver.status = 200
    assert code == 302 and "redirects are not followed" in error
    assert Receiver.hits == ["/h"]  # never /elsewhere


def test_a_receiver_slower_than_the_timeout_is_a_failed_try():
    import socket

    from worker.webhooks import post

    with socket.socket() as listener:  # accepts, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/slow"
        settings = Settings(webhook_allow_private=True, webhook_timeout_seconds=0.5)
        started = time.monotonic()
        code, error = post(settings, url, "s", delivery())
    assert code is None and "Timeout" in error and time.monotonic() - started < 3


def test_every_event_name_maps_from_a_job_status():
    assert sorted(webhooks.EVENT_OF_STATUS.values()) == sorted(webhooks.EVENTS)


def test_allowing_private_addresses_is_warned_about():
    assert not Settings().warnings()
    (warning,) = Settings(webhook_allow_private=True).warnings()
    assert "WEBHOOK_ALLOW_PRIVATE" in warning


def test_the_readmes_verification_snippet_accepts_our_signature_and_nothing_else():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("```python\nimport hashlib, hmac, time\n")
    snippet = readme[start + len("```python\n") : readme.index("```", start + 3)]
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - our own README
    body = b'{"id":"evt_1","type":"job.failed"}'
    header = signature("whsec_abc", int(time.time()), body)
    assert scope["verify"]("whsec_abc", header, body)
    assert not scope["verify"]("whsec_abc", header, body + b" ")
    assert not scope["verify"]("whsec_other", header, body)
    old = signature("whsec_abc", int(time.time()) - 3600, body)
    assert not scope["verify"]("whsec_abc", old, body)


def test_a_receiver_that_drips_its_answer_is_cut_at_the_overall_timeout():
    """Each byte arrives inside the per-read timeout; the whole try still ends at
    WEBHOOK_TIMEOUT_SECONDS (plus one read), not when the drip ends."""
    import socket

    from worker.webhooks import post

    stop = threading.Event()

    def drip(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200:
                if stop.is_set():
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.1)

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        thread = threading.Thread(target=drip, args=(listener,), daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/drip"
        settings = Settings(webhook_allow_private=True, webhook_timeout_seconds=1.0)
        started = time.monotonic()
        code, error = post(settings, url, "s", delivery())
        took = time.monotonic() - started
        stop.set()
    assert code is None and "Timeout" in error and "WEBHOOK_TIMEOUT_SECONDS" in error
    assert took < 2.0  # the drip alone would take over 20 s

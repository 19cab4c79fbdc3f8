"""Webhook endpoints and deliveries in the database, and every state change of a delivery.

A job's state change (`announce`/`notify`, called after the transition committed) adds one
`pending` delivery per endpoint that wants the event: the tenant's endpoints and the job's
own `webhook_url`. The event id names the change (`evt_<job>_running_<attempt>`,
`evt_<job>_succeeded`), and (endpoint, event id) is unique, so announcing twice is harmless.
Then a task is sent per delivery (core/queue.py); the worker (`worker/webhooks.py`) claims a
try, posts, and records it here.

Deliveries follow core/transitions.py: each change is one guarded UPDATE.
- claim: `pending` and due -> still `pending`, its `next_attempt_at` pushed a lease ahead,
  so a duplicate task (the sweep resent it, the broker redelivered it) finds it not due;
- record: appends the try to `attempt_log`; 2xx -> `succeeded`; out of tries -> `failed`;
  else `pending`, due after the backoff, and the task is sent again with that countdown;
- redeliver: `succeeded|failed` -> `pending` with its tries reset (on demand, by the API);
- sweep: `pending` deliveries overdue by more than a lease (a lost message, a worker killed
  mid-try) are sent again, by every reaper round.

Secrets are stored as-is: the service must sign with them, so they cannot be hashed like
API keys; they are shown once (at creation) and never returned by a read.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import queue, webhooks
from core.db import session_scope, utcnow
from core.errors import ErrorCode, ServiceError
from core.models import Job, WebhookDelivery, WebhookEndpoint, new_id
from core.settings import Settings
from core.tenancy import Principal, audit

log = logging.getLogger(__name__)

PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"
MAX_ENDPOINTS = 20  # per tenant: each event fans out to all of them
MAX_LOGGED_TRIES = 50  # attempt_log keeps the latest


def lease_seconds(settings: Settings) -> float:
    """How long a claimed try may take before the sweep sends it again."""
    return 2 * settings.webhook_timeout_seconds + 30


def refuse_url(url: str, settings: Settings) -> None:
    """WEBHOOK_URL_REFUSED naming why, unless `url` may receive webhooks."""
    try:
        webhooks.check_url(url, settings.webhook_allow_private)
    except webhooks.UrlRefused as exc:
        raise ServiceError(ErrorCode.WEBHOOK_URL_REFUSED, str(exc)) from exc


def job_endpoint(job: Job, url: str | None, settings: Settings) -> WebhookEndpoint | None:
    """The endpoint of a job submitted with `webhook_url` (checked here, before the job is
    committed); the caller adds it to the job's transaction."""
    if url is None:
        return None
    refuse_url(url, settings)
    return WebhookEndpoint(
        id=new_id("whk"),
        tenant_id=job.tenant_id,
        job_id=job.id,
        url=url,
        secret=webhooks.new_secret(),
        events=list(webhooks.EVENTS),
    )


def job_secret(session: Session, job_id: str) -> str | None:
    """The secret of the job's own endpoint: shown once, in the create response."""
    found = select(WebhookEndpoint.secret).where(WebhookEndpoint.job_id == job_id)
    return session.scalar(found.limit(1))


def register(
    session: Session,
    principal: Principal,
    url: str,
    events: list[str],
    description: str | None,
    settings: Settings,
    client: str | None = None,
) -> WebhookEndpoint:
    """A tenant endpoint for every job's `events`; its secret is on the returned row."""
    count = session.scalar(
        select(func.count()).where(
            WebhookEndpoint.tenant_id == principal.tenant_id,
            WebhookEndpoint.job_id.is_(None),
            WebhookEndpoint.deleted_at.is_(None),
        )
    )
    if (count or 0) >= MAX_ENDPOINTS:
        raise ServiceError(
            ErrorCode.WEBHOOK_LIMIT,
            f"your tenant has {count} webhook endpoints, the most allowed ({MAX_ENDPOINTS}); "
            "delete one with DELETE /v1/webhooks/{id} first",
        )
    refuse_url(url, settings)
    endpoint = WebhookEndpoint(
        id=new_id("whk"),
        tenant_id=principal.tenant_id,
        url=url,
        secret=webhooks.new_secret(),
        events=sorted(set(events), key=webhooks.EVENTS.index),
        description=description,
    )
    session.add(endpoint)
    audit(session, principal, "webhook.create", "webhook", endpoint.id, client, {"url": url})
    session.commit()
    return endpoint


def get_endpoint(session: Session, principal: Principal, endpoint_id: str) -> WebhookEndpoint:
    """The caller's tenant endpoint; another tenant's, a job's or a deleted one: 404."""
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if (
        endpoint is None
        or endpoint.tenant_id != principal.tenant_id
        or endpoint.job_id is not None
        or endpoint.deleted_at is not None
    ):
        raise ServiceError(ErrorCode.WEBHOOK_NOT_FOUND, f"webhook {endpoint_id!r} not found")
    return endpoint


def delete_endpoint(
    session: Session, principal: Principal, endpoint_id: str, client: str | None = None
) -> None:
    """No more deliveries to it; its delivery log is kept (the job's list still shows it)."""
    endpoint = get_endpoint(session, principal, endpoint_id)
    endpoint.deleted_at = utcnow()
    audit(session, principal, "webhook.delete", "webhook", endpoint_id, client)
    session.commit()


def get_delivery(session: Session, principal: Principal, delivery_id: str) -> WebhookDelivery:
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.tenant_id != principal.tenant_id:
        raise ServiceError(ErrorCode.DELIVERY_NOT_FOUND, f"delivery {delivery_id!r} not found")
    return delivery


def deliveries(
    session: Session, where: list[Any], limit: int, offset: int
) -> tuple[list[WebhookDelivery], int]:
    """One page of deliveries, newest first, and the total."""
    rows = session.scalars(
        select(WebhookDelivery)
        .where(*where)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id)
        .limit(limit)
        .offset(offset)
    ).all()
    count = session.scalar(select(func.count()).select_from(WebhookDelivery).where(*where))
    return list(rows), count or 0


def emit(session: Session, job_id: str) -> list[str]:
    """Pending deliveries for the job's current state (if it is one with an event), one per
    endpoint that wants it and has none for it yet. Commits; returns the new ids."""
    job = session.get(Job, job_id, populate_existing=True)
    event = webhooks.EVENT_OF_STATUS.get(job.status) if job is not None else None
    if job is None or event is None:
        return []
    event_id = f"evt_{job.id}_{job.status}" + (
        f"_{job.attempts}" if job.status == "running" else ""
    )
    targets = session.scalars(
        select(WebhookEndpoint).where(
            WebhookEndpoint.tenant_id == job.tenant_id,
            WebhookEndpoint.deleted_at.is_(None),
            (WebhookEndpoint.job_id.is_(None)) | (WebhookEndpoint.job_id == job.id),
        )
    ).all()
    done = set(
        session.scalars(
            select(WebhookDelivery.endpoint_id).where(WebhookDelivery.event_id == event_id)
        ).all()
    )
    payload = webhooks.event_payload(job, event, event_id)
    now = utcnow()
    new = [
        WebhookDelivery(
            id=new_id("whd"),
            tenant_id=job.tenant_id,
            endpoint_id=endpoint.id,
            job_id=job.id,
            event=event,
            event_id=event_id,
            payload=payload,
            status=PENDING,
            attempts=0,
            attempt_log=[],
            next_attempt_at=now,
        )
        for endpoint in targets
        if event in endpoint.events and endpoint.id not in done
    ]
    if not new:
        return []
    session.add_all(new)
    try:
        session.commit()
    except IntegrityError:  # announced at the same moment elsewhere: that one sends them
        session.rollback()
        return []
    return [d.id for d in new]


def notify(session: Session, job_id: str, settings: Settings | None = None) -> None:
    """emit, then send each new delivery. Never raises: a job's state change stands whatever
    happens to its webhooks (an unsent delivery stays pending; the sweep sends it)."""
    try:
        for delivery_id in emit(session, job_id):
            queue.send_webhook(delivery_id, settings)
    except Exception:  # noqa: BLE001
        session.rollback()
        log.warning("job %s: webhook deliveries not queued", job_id, exc_info=True)


def announce(settings: Settings, job_id: str) -> None:
    """notify, in a session of its own (the worker, the reaper)."""
    try:
        with session_scope(settings) as session:
            notify(session, job_id, settings)
    except Exception:  # noqa: BLE001
        log.warning("job %s: webhook deliveries not queued", job_id, exc_info=True)


def claim(session: Session, delivery_id: str, settings: Settings) -> bool:
    """Take one try of a due delivery (a lease until it is recorded). False: not due, done,
    or another copy of the task has it."""
    now = utcnow()
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == PENDING,
            WebhookDelivery.next_attempt_at <= now + timedelta(seconds=1),
        )
        .values(next_attempt_at=now + timedelta(seconds=lease_seconds(settings)))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def record(
    session: Session,
    delivery_id: str,
    settings: Settings,
    status_code: int | None,
    error: str | None,
    final: bool = False,
) -> float | None:
    """Record a try. Returns the countdown to the next one, or None when the delivery is
    done (succeeded, or failed: out of tries, or `final`: its endpoint is gone)."""
    delivery = session.get(
        WebhookDelivery, delivery_id, with_for_update=True, populate_existing=True
    )
    if delivery is None or delivery.status != PENDING:
        session.rollback()
        return None
    now = utcnow()
    ok = status_code is not None and 200 <= status_code < 300 and error is None
    tries = delivery.attempts + 1
    entry = {"at": now.isoformat(), "status_code": status_code, "error": error}
    delivery.attempt_log = [*delivery.attempt_log, entry][-MAX_LOGGED_TRIES:]
    delivery.attempts = tries
    delivery.last_status_code = status_code
    delivery.last_error = error
    countdown: float | None = None
    if ok:
        delivery.status, delivery.delivered_at, delivery.next_attempt_at = SUCCEEDED, now, None
    elif final or tries >= settings.webhook_max_attempts:
        delivery.status, delivery.next_attempt_at = FAILED, None
    else:
        countdown = webhooks.backoff_seconds(
            tries, settings.webhook_backoff_seconds, settings.webhook_backoff_max_seconds
        )
        delivery.next_attempt_at = now + timedelta(seconds=countdown)
    session.commit()
    return countdown


def redeliver(
    session: Session,
    principal: Principal,
    delivery_id: str,
    settings: Settings,
    client: str | None = None,
) -> WebhookDelivery:
    """Send a finished delivery again, with a fresh set of tries (same event id: receivers
    that deduplicate by it see the same event)."""
    get_delivery(session, principal, delivery_id)
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status.in_((SUCCEEDED, FAILED)))
        .values(status=PENDING, attempts=0, next_attempt_at=utcnow(), delivered_at=None)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise ServiceError(
            ErrorCode.DELIVERY_IN_PROGRESS,
            f"delivery {delivery_id} is still pending (being tried); redeliver it once it has "
            "succeeded or failed",
        )
    audit(session, principal, "webhook.redeliver", "delivery", delivery_id, client)
    session.commit()
    try:
        queue.send_webhook(delivery_id, settings)
    except Exception:  # noqa: BLE001 - pending: the sweep sends it
        log.warning("delivery %s: task not sent; left to the sweep", delivery_id, exc_info=True)
    session.expire_all()
    return get_delivery(session, principal, delivery_id)


def resend_overdue(settings: Settings, limit: int = 200) -> list[str]:
    """Pending deliveries overdue by more than a lease: their task was lost (never sent, a
    broker restart, a worker killed mid-try) or waits behind a busy light queue. Stamped due
    now, so each is resent at most once per lease by all the reapers together; the claim
    drops duplicates."""
    now = utcnow()
    overdue = (
        WebhookDelivery.status == PENDING,
        WebhookDelivery.next_attempt_at < now - timedelta(seconds=lease_seconds(settings)),
    )
    resend: list[str] = []
    with session_scope(settings) as session:
        found = session.scalars(select(WebhookDelivery.id).where(*overdue).limit(limit)).all()
        for delivery_id in found:
            result = session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, *overdue)
                .values(next_attempt_at=now)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                resend.append(delivery_id)
        session.commit()
    for delivery_id in resend:
        queue.send_webhook(delivery_id, settings)
    if resend:
        log.warning("%d overdue webhook deliveries sent again", len(resend))
    return resend

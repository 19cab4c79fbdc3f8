"""Wire schemas of webhooks: endpoints (the secret only in the create answer), deliveries
with every try, and the job create answer that carries a `webhook_url` job's secret."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from core.db import as_utc
from core.models import WebhookDelivery, WebhookEndpoint
from service.schemas import NO_NUL, JobPublic

Event = Literal["job.running", "job.succeeded", "job.failed", "job.canceled"]
ALL_EVENTS: list[Event] = ["job.running", "job.succeeded", "job.failed", "job.canceled"]


class JobCreated(JobPublic):
    webhook_secret: str | None = Field(
        None,
        description="the signing secret of this job's `webhook_url`, shown only here, once",
    )


class WebhookCreate(BaseModel):
    url: str = Field(
        max_length=2048,
        pattern=r"^[hH][tT][tT][pP][sS]?://",
        description="a public http(s) URL; private, loopback and link-local addresses are "
        "refused (unless the operator set WEBHOOK_ALLOW_PRIVATE=true)",
    )
    events: list[Event] = Field(default_factory=lambda: list(ALL_EVENTS), min_length=1)
    description: str | None = Field(None, max_length=200, pattern=NO_NUL)


class WebhookPublic(BaseModel):
    id: str
    url: str
    events: list[str]
    description: str | None
    created_at: datetime


class WebhookCreated(WebhookPublic):
    secret: str = Field(description="signs every delivery (Finetune-Signature); shown only here")


class WebhooksPublic(BaseModel):
    data: list[WebhookPublic]
    count: int


class DeliveryTry(BaseModel):
    at: datetime
    status_code: int | None
    error: str | None


class DeliveryPublic(BaseModel):
    id: str
    webhook_id: str
    job_id: str
    event: str
    event_id: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None
    tries: list[DeliveryTry]
    payload: dict[str, Any]


class DeliveriesPublic(BaseModel):
    data: list[DeliveryPublic]
    count: int


def webhook_public(endpoint: WebhookEndpoint) -> WebhookPublic:
    return WebhookPublic(
        id=endpoint.id,
        url=endpoint.url,
        events=list(endpoint.events),
        description=endpoint.description,
        created_at=as_utc(endpoint.created_at),  # type: ignore[arg-type]
    )


def delivery_public(d: WebhookDelivery) -> DeliveryPublic:
    return DeliveryPublic(
        id=d.id,
        webhook_id=d.endpoint_id,
        job_id=d.job_id,
        event=d.event,
        event_id=d.event_id,
        status=d.status,  # type: ignore[arg-type]
        attempts=d.attempts,
        last_status_code=d.last_status_code,
        last_error=d.last_error,
        next_attempt_at=as_utc(d.next_attempt_at),
        created_at=as_utc(d.created_at),  # type: ignore[arg-type]
        delivered_at=as_utc(d.delivered_at),
        tries=[DeliveryTry(**t) for t in d.attempt_log or []],
        payload=d.payload,
    )

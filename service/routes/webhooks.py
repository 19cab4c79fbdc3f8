"""Webhooks: a tenant's endpoints (register, list, read, delete), the delivery log of an
endpoint or of a job, and redelivery on demand. The rules live in `core/webhook_store.py`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from core import jobs, webhook_store
from core.models import WebhookDelivery, WebhookEndpoint
from service.deps import (
    Offset,
    PathId,
    ReadDep,
    SessionDep,
    SettingsDep,
    WriteDep,
    client_of,
    page,
)
from service.errors import ERROR_RESPONSES
from service.webhook_schemas import (
    DeliveriesPublic,
    DeliveryPublic,
    WebhookCreate,
    WebhookCreated,
    WebhookPublic,
    WebhooksPublic,
    delivery_public,
    webhook_public,
)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=ERROR_RESPONSES)
deliveries_router = APIRouter(prefix="/v1", tags=["webhooks"], responses=ERROR_RESPONSES)
Limit = Annotated[int, Query(ge=1, le=500)]


@router.post("", status_code=201, response_model=WebhookCreated)
def create_webhook(
    request: Request,
    body: WebhookCreate,
    principal: WriteDep,
    session: SessionDep,
    settings: SettingsDep,
) -> WebhookCreated:
    """Every job of the tenant posts the chosen `events` here, signed with the returned
    `secret` (shown only in this answer; see the README for the verification snippet)."""
    endpoint = webhook_store.register(
        session,
        principal,
        body.url,
        list(body.events),
        body.description,
        settings,
        client_of(request),
    )
    return WebhookCreated(**webhook_public(endpoint).model_dump(), secret=endpoint.secret)


@router.get("", response_model=WebhooksPublic)
def list_webhooks(
    principal: ReadDep, session: SessionDep, limit: Limit = 50, offset: Offset = 0
) -> WebhooksPublic:
    where = [
        WebhookEndpoint.tenant_id == principal.tenant_id,
        WebhookEndpoint.job_id.is_(None),
        WebhookEndpoint.deleted_at.is_(None),
    ]
    order = (WebhookEndpoint.created_at.desc(), WebhookEndpoint.id)
    rows, count = page(session, WebhookEndpoint, where, order, limit, offset)
    return WebhooksPublic(data=[webhook_public(e) for e in rows], count=count)


@router.get("/{webhook_id}", response_model=WebhookPublic)
def read_webhook(webhook_id: PathId, principal: ReadDep, session: SessionDep) -> WebhookPublic:
    return webhook_public(webhook_store.get_endpoint(session, principal, webhook_id))


@router.delete("/{webhook_id}", status_code=204)
def delete_webhook(
    request: Request, webhook_id: PathId, principal: WriteDep, session: SessionDep
) -> Response:
    """No more deliveries to it (pending ones fail); its delivery log stays readable
    through the jobs' `webhook-deliveries`."""
    webhook_store.delete_endpoint(session, principal, webhook_id, client_of(request))
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", response_model=DeliveriesPublic)
def list_webhook_deliveries(
    webhook_id: PathId,
    principal: ReadDep,
    session: SessionDep,
    limit: Limit = 50,
    offset: Offset = 0,
) -> DeliveriesPublic:
    """Newest first, each with every try's status code or error."""
    webhook_store.get_endpoint(session, principal, webhook_id)
    rows, count = webhook_store.deliveries(
        session, [WebhookDelivery.endpoint_id == webhook_id], limit, offset
    )
    return DeliveriesPublic(data=[delivery_public(d) for d in rows], count=count)


@deliveries_router.get("/jobs/{job_id}/webhook-deliveries", response_model=DeliveriesPublic)
def list_job_webhook_deliveries(
    job_id: PathId,
    principal: ReadDep,
    session: SessionDep,
    limit: Limit = 50,
    offset: Offset = 0,
) -> DeliveriesPublic:
    """The job's events as delivered to each endpoint (its own `webhook_url`, the tenant's)."""
    jobs.get_owned_job(session, principal, job_id)
    where = [WebhookDelivery.job_id == job_id, WebhookDelivery.tenant_id == principal.tenant_id]
    rows, count = webhook_store.deliveries(session, where, limit, offset)
    return DeliveriesPublic(data=[delivery_public(d) for d in rows], count=count)


@deliveries_router.post(
    "/webhook-deliveries/{delivery_id}/redeliver", status_code=202, response_model=DeliveryPublic
)
def redeliver(
    request: Request,
    delivery_id: PathId,
    principal: WriteDep,
    session: SessionDep,
    settings: SettingsDep,
) -> DeliveryPublic:
    """Send a succeeded or failed delivery again, with fresh tries (409 while pending)."""
    delivery = webhook_store.redeliver(
        session, principal, delivery_id, settings, client_of(request)
    )
    return delivery_public(delivery)

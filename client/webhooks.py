"""Webhooks: the tenant's endpoints and their delivery log. A job can also carry its own
endpoint: `jobs.submit(..., webhook_url=...)`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from client._http import Transport
from client.models import Page, Wire


class Webhook(Wire):
    id: str
    url: str
    events: list[str]
    description: str | None = None
    created_at: datetime
    secret: str | None = None  # only in the answer that created it


class WebhookList(Page):
    data: list[Webhook]


class Delivery(Wire):
    id: str
    webhook_id: str
    job_id: str
    event: str
    status: str
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: datetime
    delivered_at: datetime | None = None
    tries: list[dict[str, Any]] = []
    payload: dict[str, Any] = {}


class Deliveries(Page):
    data: list[Delivery]


class Webhooks:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def create(
        self, url: str, events: list[str] | None = None, description: str | None = None
    ) -> Webhook:
        """Register an endpoint for every job of the tenant; keep the returned `secret`
        (shown once), which signs each delivery."""
        body: dict[str, Any] = {"url": url}
        if events is not None:
            body["events"] = events
        if description is not None:
            body["description"] = description
        return self._t.call(Webhook, "POST", "/v1/webhooks", json=body)

    def list(self, limit: int = 50, offset: int = 0) -> WebhookList:
        params = {"limit": limit, "offset": offset}
        return self._t.call(WebhookList, "GET", "/v1/webhooks", params=params)

    def get(self, webhook_id: str) -> Webhook:
        return self._t.call(Webhook, "GET", f"/v1/webhooks/{webhook_id}")

    def delete(self, webhook_id: str) -> None:
        self._t.request("DELETE", f"/v1/webhooks/{webhook_id}")

    def deliveries(self, webhook_id: str, limit: int = 50, offset: int = 0) -> Deliveries:
        params = {"limit": limit, "offset": offset}
        path = f"/v1/webhooks/{webhook_id}/deliveries"
        return self._t.call(Deliveries, "GET", path, params=params)

    def job_deliveries(self, job_id: str, limit: int = 50, offset: int = 0) -> Deliveries:
        params = {"limit": limit, "offset": offset}
        path = f"/v1/jobs/{job_id}/webhook-deliveries"
        return self._t.call(Deliveries, "GET", path, params=params)

    def redeliver(self, delivery_id: str) -> Delivery:
        """Send a finished delivery again, with fresh tries."""
        path = f"/v1/webhook-deliveries/{delivery_id}/redeliver"
        return self._t.call(Delivery, "POST", path)

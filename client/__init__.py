"""The Python client of the finetune service: `httpx` and `pydantic` only (no torch, none
of the server's code), so it installs anywhere a script runs.

    from client import Client

    with Client("http://127.0.0.1:8000", api_key="ft_...") as api:
        ds = api.datasets.upload("./flowers", progress=lambda sent, total: ...)
        job = api.jobs.submit(ds.id, time_budget_seconds=600)
        job = api.jobs.wait(job.id, callback=lambda j: print(j.status, j.progress.step))
        api.jobs.download(job.id, "model.zip")

Every error answer raises `ApiError(status, error_code, detail)`; an unreachable server is
status 0, error_code `UNREACHABLE`. Without arguments the URL and the key come from
FINETUNE_URL and FINETUNE_API_KEY."""

from __future__ import annotations

from types import TracebackType

import httpx

from client import models
from client._http import DEFAULT_URL, ApiError, ProgressCallback, Transport
from client.jobs import Jobs
from client.resources import Datasets, Models
from client.webhooks import Webhooks


class Client:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.transport = Transport(base_url, api_key, timeout=timeout, http=http)
        self.datasets = Datasets(self.transport)
        self.jobs = Jobs(self.transport)
        self.models = Models(self.transport)
        self.webhooks = Webhooks(self.transport)

    @property
    def base_url(self) -> str:
        return self.transport.base_url

    def backbones(self) -> models.Backbones:
        return self.transport.call(models.Backbones, "GET", "/v1/backbones")

    def me(self) -> models.Me:
        """The tenant and the scopes of the key in use (and the tenant's limits, usage)."""
        return self.transport.call(models.Me, "GET", "/v1/me")

    def healthz(self) -> bool:
        """The API process answers."""
        return self.transport.request("GET", "/healthz").status_code == 200

    def readyz(self) -> bool:
        """The API can reach its database, broker and storage."""
        try:
            return self.transport.request("GET", "/readyz").status_code == 200
        except ApiError as exc:
            if exc.status == 503:
                return False
            raise

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["DEFAULT_URL", "ApiError", "Client", "ProgressCallback", "models"]

"""The web dashboard: `/` serves the page and `/static/` its scripts and styles, all from
the package (no CDN, no build step), so it works on a host with no network.

The page and its files are public; every piece of data comes from `/v1/` with the key the
user typed, which the browser keeps in sessionStorage and sends as a header (never in a
URL). A strict Content-Security-Policy allows only this origin's scripts and styles.

`GET /v1/jobs/{id}/model/link` exists for browsers: a page can send the key with `fetch()`
but cannot read the `Location` of the 307 that `/model` answers with S3 storage, and
following it from `fetch()` would need CORS on the bucket. The link lets the page navigate
to the presigned URL itself (or fetch `/model` with the key when the API streams it)."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from core import jobs
from service.deps import PathId, ReadDep, SessionDep, SettingsDep, StoreDep, client_of
from service.errors import ERROR_RESPONSES
from service.routes.jobs import ModelFormat

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

page_router = APIRouter(include_in_schema=False)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)


class ModelLink(BaseModel):
    url: str | None = Field(
        description="a short-lived presigned GET URL (S3 storage); null when the API streams "
        "the file itself: then GET /v1/jobs/{id}/model with the key"
    )
    filename: str = Field(description="the download's file name")


class Dashboard(StaticFiles):
    """The static files, each answered with the page's security headers."""

    def file_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response


def static_files() -> StaticFiles:
    return Dashboard(directory=STATIC_DIR)


@page_router.get("/")
def read_dashboard() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


@router.get("/{job_id}/model/link", response_model=ModelLink)
def read_model_link(
    request: Request,
    job_id: PathId,
    principal: ReadDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    format: ModelFormat = "zip",  # noqa: A002
) -> ModelLink:
    """Where a browser downloads the job's model from: the presigned URL `/model` would
    redirect to, or null when the API streams the file (local storage)."""
    model = jobs.open_model(session, store, settings, principal, job_id, format, client_of(request))
    match = re.search(r'filename="?([^";]+)"?', model.disposition)
    return ModelLink(url=model.url, filename=match.group(1) if match else f"model.{format}")

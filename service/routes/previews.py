"""Augmentation previews. Rendering needs torch, which the API process never imports: the
route sends `finetune.render_preview` to the light queue and serves what the worker stored.

Per preview (its key from `core.queue.preview_key`) the store holds at most
`<key>.png` (done), `<key>.error.json` (failed for good) and `<key>.pending` (the time the
task was sent; a marker older than PREVIEW_RESEND_SECONDS is taken as lost and sent again).

What previews cost is bounded: a tenant has at most TENANT_MAX_RENDERING_PREVIEWS rendering
at once (`service.concurrency.RenderSlots`; past it 429 RATE_LIMITED), and a dataset keeps at
most MAX_PREVIEWS_PER_DATASET of them: `previews/index.json` lists them in the order they
were asked for, and sending a new one deletes the oldest past the limit. The list is read
and written under a lock of this process; two API replicas sending at the same instant may
drop one entry, whose preview then stays until its dataset is deleted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from functools import partial
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from core import queue
from core.datasets import get_owned_dataset
from core.settings import Settings
from core.storage import ObjectStore, StorageError, StorageNotFound
from core.tenancy import Principal
from service.concurrency import RenderSlots
from service.deps import (
    PathId,
    PreviewThreadsDep,
    ReadDep,
    RenderSlotsDep,
    SessionDep,
    SettingsDep,
    StoreDep,
)
from service.errors import ERROR_RESPONSES, ErrorCode, ServiceError

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERROR_RESPONSES)

# A render takes seconds; a marker this old means its task (or its worker) was lost.
PREVIEW_RESEND_SECONDS = 60.0
RETRY_AFTER_SECONDS = 2
# Guards each dataset's preview list against this process's other requests.
_INDEX_LOCK = threading.Lock()

# dataset_id, augmentation, image_size, seed, samples: the task's arguments
PreviewArgs = tuple[str, dict[str, Any], int, int, int]


class PreviewRendering(BaseModel):
    """202: not rendered yet; a worker is on it. Ask again after `Retry-After` seconds."""

    status: Literal["rendering"] = "rendering"
    detail: str


_RENDERING: dict[int | str, dict[str, Any]] = {
    202: {
        "model": PreviewRendering,
        "description": "being rendered by a worker: ask again after `Retry-After` seconds",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
    }
}


def _read(store: ObjectStore, key: str) -> bytes | None:
    """The object, or None when there is none; a store that cannot be reached is a 503."""
    try:
        return store.get_bytes(key)
    except StorageNotFound:
        return None
    except StorageError as exc:
        raise ServiceError(ErrorCode.STORAGE_UNAVAILABLE, f"the object store: {exc}") from exc


def _sent_at(marker: bytes | None) -> float:
    """When the pending task was sent; 0 (long ago) when none was or the marker is unreadable."""
    try:
        return float(marker or 0)
    except ValueError:
        return 0.0


def _remember(store: ObjectStore, dataset_id: str, key: str, keep: int) -> None:
    """Put `key` last in its dataset's preview list, and delete the previews past `keep`."""
    index_key = f"{queue.previews_prefix(dataset_id)}/index.json"
    name = key.rsplit("/", 1)[-1]
    with _INDEX_LOCK:
        try:
            names = [n for n in json.loads(_read(store, index_key) or b"[]") if n != name]
        except (ValueError, TypeError):
            names = []  # unreadable: start afresh (what it listed stays until the dataset goes)
        names.append(name)
        evicted, names = names[:-keep], names[-keep:]
        try:
            store.put_bytes(index_key, json.dumps(names).encode())
            for old in evicted:
                for suffix in queue.PREVIEW_SUFFIXES:
                    store.delete_prefix(f"{queue.previews_prefix(dataset_id)}/{old}{suffix}")
        except StorageError as exc:
            raise ServiceError(ErrorCode.STORAGE_UNAVAILABLE, f"the object store: {exc}") from exc


def _start(
    store: ObjectStore,
    settings: Settings,
    slots: RenderSlots,
    tenant: str,
    key: str,
    args: PreviewArgs,
) -> None:
    """Send the render, within the tenant's cap on previews rendering at once."""
    cap = settings.tenant_max_rendering_previews
    if not slots.take(tenant, key, cap):
        # Some of those counted may have finished without anyone asking for them since.
        slots.release_finished(tenant, lambda k: store.exists(f"{k}.pending"))
        if not slots.take(tenant, key, cap):
            raise ServiceError(
                ErrorCode.RATE_LIMITED,
                f"this tenant already has {cap} previews rendering "
                "(TENANT_MAX_RENDERING_PREVIEWS); ask again when one of them is ready",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
    try:
        _remember(store, args[0], key, settings.max_previews_per_dataset)
        _send(store, settings, key, args)
    except BaseException:
        slots.done(tenant, key)
        raise
    slots.sent(tenant, key)


def _send(store: ObjectStore, settings: Settings, key: str, args: PreviewArgs) -> None:
    """Mark the preview pending, then send its task; a marker without a task is undone."""
    try:
        store.put_bytes(f"{key}.pending", str(time.time()).encode())
    except StorageError as exc:
        raise ServiceError(ErrorCode.STORAGE_UNAVAILABLE, f"the object store: {exc}") from exc
    try:
        queue.send_preview(*args, settings=settings)
    except Exception as exc:
        log.exception("could not send the preview task for %s", key)
        store.delete_prefix(f"{key}.pending")
        raise ServiceError(
            ErrorCode.BROKER_UNAVAILABLE, "the task queue is unreachable; try again later"
        ) from exc


@router.get(
    "/{dataset_id}/augmentations/preview",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **_RENDERING},
)
async def read_augmentation_preview(
    dataset_id: PathId,
    principal: ReadDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    slots: RenderSlotsDep,
    threads: PreviewThreadsDep,
    preset: Literal["none", "light", "standard", "strong"] = "light",
    hflip: bool = True,
    image_size: Annotated[int, Query(ge=32, le=512)] = 224,
    seed: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    samples: Annotated[int, Query(ge=1, le=16)] = 8,
) -> Response:
    """A PNG grid: rows are sample images (one class after another), columns are four
    augmented draws, through the same transforms a job with this augmentation uses.
    The first request starts rendering and answers 202; ask again until it answers 200.
    429 while the tenant has TENANT_MAX_RENDERING_PREVIEWS others rendering."""
    augmentation: dict[str, Any] = {"preset": preset, "hflip": hflip}
    args: PreviewArgs = (dataset_id, augmentation, image_size, seed, samples)
    serve = partial(_serve, session, store, settings, slots, principal, args)
    async with threads.of(principal.tenant_id):
        return await anyio.to_thread.run_sync(serve, limiter=threads.total)


def _serve(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    slots: RenderSlots,
    principal: Principal,
    args: PreviewArgs,
) -> Response:
    """The PNG, the failure, or 202 (sending the render if need be), on the tenant's own
    preview threads."""
    get_owned_dataset(session, principal, args[0])
    key = queue.preview_key(*args)
    png = _read(store, f"{key}.png")
    if png is not None:
        slots.done(principal.tenant_id, key)
        return Response(png, media_type="image/png")
    failure = _read(store, f"{key}.error.json")
    if failure is not None:
        slots.done(principal.tenant_id, key)
        message = json.loads(failure)["message"]
        raise ServiceError(ErrorCode.PREVIEW_FAILED, f"rendering the preview failed: {message}")
    if time.time() - _sent_at(_read(store, f"{key}.pending")) > PREVIEW_RESEND_SECONDS:
        _start(store, settings, slots, principal.tenant_id, key, args)
    body = PreviewRendering(detail="the preview is being rendered; ask again shortly")
    return JSONResponse(
        body.model_dump(),
        status_code=202,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )

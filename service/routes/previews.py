"""Augmentation previews. Rendering needs torch, which the API process never imports: the
route sends `finetune.render_preview` to the light queue and serves what the worker stored.

Per preview (its key from `core.queue.preview_key`) the store holds at most
`<key>.png` (done), `<key>.error.json` (failed for good) and `<key>.pending` (the time the
task was sent; a marker older than PREVIEW_RESEND_SECONDS is taken as lost and sent again).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from core import queue
from core.datasets import get_owned_dataset
from core.settings import Settings
from core.storage import ObjectStore, StorageError, StorageNotFound
from service.deps import PathId, ReadDep, SessionDep, SettingsDep, StoreDep
from service.errors import ERROR_RESPONSES, ErrorCode, ServiceError

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERROR_RESPONSES)

# A render takes seconds; a marker this old means its task (or its worker) was lost.
PREVIEW_RESEND_SECONDS = 60.0
RETRY_AFTER_SECONDS = 2

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
def read_augmentation_preview(
    dataset_id: PathId,
    principal: ReadDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    preset: Literal["none", "light", "standard", "strong"] = "light",
    hflip: bool = True,
    image_size: Annotated[int, Query(ge=32, le=512)] = 224,
    seed: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    samples: Annotated[int, Query(ge=1, le=16)] = 8,
) -> Response:
    """A PNG grid: rows are sample images (one class after another), columns are four
    augmented draws, through the same transforms a job with this augmentation uses.
    The first request starts rendering and answers 202; ask again until it answers 200."""
    get_owned_dataset(session, principal, dataset_id)
    augmentation: dict[str, Any] = {"preset": preset, "hflip": hflip}
    args: PreviewArgs = (dataset_id, augmentation, image_size, seed, samples)
    key = queue.preview_key(*args)
    png = _read(store, f"{key}.png")
    if png is not None:
        return Response(png, media_type="image/png")
    failure = _read(store, f"{key}.error.json")
    if failure is not None:
        message = json.loads(failure)["message"]
        raise ServiceError(ErrorCode.PREVIEW_FAILED, f"rendering the preview failed: {message}")
    if time.time() - _sent_at(_read(store, f"{key}.pending")) > PREVIEW_RESEND_SECONDS:
        _send(store, settings, key, args)
    body = PreviewRendering(detail="the preview is being rendered; ask again shortly")
    return JSONResponse(
        body.model_dump(),
        status_code=202,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )

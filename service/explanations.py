"""Explanations: why a trained model predicts what it does for one image, as a Grad-CAM
overlay. Computing one needs torch, which the API never imports: the route decodes and
checks the upload, stores the model's input, sends `finetune.explain` to the light queue and
serves what the worker stores.

Per explanation (its key from `core.queue.explanation_key`) the store holds the input
(`<key>.input.png`: the model's centre crop of the decoded upload, re-encoded, never the raw
file) and the request (`<key>.request.json`), written here; `<key>.pending` (when the task was
sent; older than EXPLAIN_RESEND_SECONDS is taken as lost and sent again); then the worker's
`<key>.png` (the overlay) and `<key>.json` (the prediction, whose presence means done), or
`<key>.error.json` (failed for good). The id is a digest of the input's pixels, the target
and the model, so asking again for the same thing is served from the store.

What it costs is bounded as for previews: explanations rendering count against the tenant's
TENANT_MAX_RENDERING_PREVIEWS (429 past it), and a job keeps its MAX_EXPLANATIONS_PER_JOB
most recent ones (`explanations/index.json`, the oldest deleted past it).

`explain_job` takes the `Job` already resolved and owned, so the same flow can be mounted
under any route that names a model.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from functools import lru_cache
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel

from core import queue
from core.imaging import crop_for_model, decode_upload
from core.jobs import model_ready
from core.models import Job
from core.settings import Settings
from core.storage import ObjectStore, StorageError, StorageNotFound
from service.concurrency import RenderSlots
from service.errors import ErrorCode, ServiceError

log = logging.getLogger(__name__)

# One explanation takes about a second once the model is loaded, a few more to load it:
# a marker this old means its task (or its worker) was lost.
EXPLAIN_RESEND_SECONDS = 60.0
RETRY_AFTER_SECONDS = 1
MAX_EXPLANATIONS_PER_JOB = 200
_INDEX_LOCK = threading.Lock()  # each job's explanation list, against this process's requests


class LabelScore(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    """What the model predicts for the image, as its metadata says to read the logits."""

    task: Literal["single-label", "multi-label"]
    explained: LabelScore  # the class the heatmap is for
    top_k: list[LabelScore]  # the most probable classes, best first
    predicted: list[str]  # single-label: the top class; multi-label: those over threshold
    backbone: str
    input_size: int
    seconds: float  # the worker's time for this explanation, the model already loaded
    # "hflip" when the model's metadata turns on flip TTA: the probabilities average the
    # image and its mirror (as predictions do), and so does the heatmap
    tta: str | None = None


class ExplanationPublic(BaseModel):
    """One explanation. Poll `status_url` while `status` is pending; once done, `image_url`
    is the overlay (the model's input with the Grad-CAM heatmap of `explained` over it)."""

    id: str
    job_id: str
    status: Literal["pending", "done", "failed"]
    target: str | None  # the class asked for; null: the predicted class
    status_url: str
    image_url: str
    prediction: Prediction | None = None
    error: str | None = None  # why it failed


def read_object(store: ObjectStore, key: str) -> bytes | None:
    """The object, or None when there is none; a store that cannot be reached is a 503."""
    try:
        return store.get_bytes(key)
    except StorageNotFound:
        return None
    except StorageError as exc:
        raise ServiceError(ErrorCode.STORAGE_UNAVAILABLE, f"the object store: {exc}") from exc


def _put(store: ObjectStore, key: str, data: bytes) -> None:
    try:
        store.put_bytes(key, data)
    except StorageError as exc:
        raise ServiceError(ErrorCode.STORAGE_UNAVAILABLE, f"the object store: {exc}") from exc


@lru_cache(maxsize=64)
def _metadata(store: ObjectStore, key: str) -> dict[str, Any]:
    """A model's metadata.json; written once per job, so it is read once per process."""
    raw = read_object(store, key)
    if raw is None:
        raise ServiceError(ErrorCode.MODEL_NOT_AVAILABLE, "the model's files are missing")
    return json.loads(raw)  # type: ignore[no-any-return]


def _public(job_id: str, eid: str, target: str | None, **state: Any) -> ExplanationPublic:
    base = f"/v1/jobs/{job_id}/explanations/{eid}"
    return ExplanationPublic(
        id=eid,
        job_id=job_id,
        target=target,
        status_url=base,
        image_url=f"{base}.png",
        **state,
    )


def _sent_at(marker: bytes | None) -> float:
    """When the pending task was sent; 0 (long ago) when none was or the marker is unreadable."""
    try:
        return float(marker or 0)
    except ValueError:
        return 0.0


def explanation_state(
    store: ObjectStore, settings: Settings, slots: RenderSlots, tenant: str, job_id: str, eid: str
) -> ExplanationPublic | None:
    """Where the explanation stands (None: there is none), sending its task again when its
    pending marker is stale."""
    key = queue.explanation_key(job_id, eid)
    request = read_object(store, f"{key}.request.json")
    if request is None:
        return None
    target = json.loads(request).get("target")
    prediction = read_object(store, f"{key}.json")
    if prediction is not None:
        slots.done(tenant, key)
        return _public(job_id, eid, target, status="done", prediction=json.loads(prediction))
    failure = read_object(store, f"{key}.error.json")
    if failure is not None:
        slots.done(tenant, key)
        reason = json.loads(failure).get("message", "unknown")
        return _public(job_id, eid, target, status="failed", error=reason)
    if time.time() - _sent_at(read_object(store, f"{key}.pending")) > EXPLAIN_RESEND_SECONDS:
        _start(store, settings, slots, tenant, job_id, eid)
    return _public(job_id, eid, target, status="pending")


def _remember(store: ObjectStore, job_id: str, eid: str) -> None:
    """Put `eid` last in its job's list, and delete the explanations past the limit."""
    index_key = f"{queue.explanations_prefix(job_id)}/index.json"
    with _INDEX_LOCK:
        try:
            ids = [i for i in json.loads(read_object(store, index_key) or b"[]") if i != eid]
        except (ValueError, TypeError):
            ids = []  # unreadable: start afresh (what it listed stays until the job goes)
        ids.append(eid)
        evicted, ids = ids[:-MAX_EXPLANATIONS_PER_JOB], ids[-MAX_EXPLANATIONS_PER_JOB:]
        _put(store, index_key, json.dumps(ids).encode())
        try:
            for old in evicted:
                for suffix in queue.EXPLANATION_SUFFIXES:
                    store.delete_prefix(f"{queue.explanation_key(job_id, old)}{suffix}")
        except StorageError as exc:
            raise ServiceError(ErrorCode.STORAGE_UNAVAILABLE, f"the object store: {exc}") from exc


def _start(
    store: ObjectStore, settings: Settings, slots: RenderSlots, tenant: str, job_id: str, eid: str
) -> None:
    """Mark the explanation pending and send its task, within the tenant's cap on renders
    at once (shared with previews); a marker without a task is undone."""
    key = queue.explanation_key(job_id, eid)
    cap = settings.tenant_max_rendering_previews
    if not slots.take(tenant, key, cap):
        # Some of those counted may have finished without anyone asking for them since.
        slots.release_finished(tenant, lambda k: store.exists(f"{k}.pending"))
        if not slots.take(tenant, key, cap):
            raise ServiceError(
                ErrorCode.RATE_LIMITED,
                f"this tenant already has {cap} previews or explanations rendering "
                "(TENANT_MAX_RENDERING_PREVIEWS); ask again when one of them is ready",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
    try:
        _put(store, f"{key}.pending", str(time.time()).encode())
        try:
            queue.send_explain(job_id, eid, settings)
        except Exception as exc:
            log.exception("could not send the explain task for %s", key)
            store.delete_prefix(f"{key}.pending")
            raise ServiceError(
                ErrorCode.BROKER_UNAVAILABLE, "the task queue is unreachable; try again later"
            ) from exc
    except BaseException:
        slots.done(tenant, key)
        raise
    slots.sent(tenant, key)


def require_model(job: Job) -> dict[str, Any]:
    """The job's result, which names its model files; 409 while it has none."""
    result = job.result or {}
    if not model_ready(job) or "safetensors_key" not in result or "metadata_key" not in result:
        raise ServiceError(
            ErrorCode.MODEL_NOT_AVAILABLE,
            f"job {job.id} is {job.status} and has no model to explain with; a model is "
            "available once it has succeeded (or was canceled with stop-and-keep, or stopped "
            "at its time limit after an epoch)",
        )
    return result


def explain_job(
    store: ObjectStore,
    settings: Settings,
    slots: RenderSlots,
    tenant: str,
    job: Job,
    filename: str,
    data: bytes,
    target: str | None,
) -> ExplanationPublic:
    """Start explaining `data` (one uploaded image) with `job`'s model, already found to be
    the caller's; or the explanation as it stands when the same one was asked for before.

    409 without a model; 413 over MAX_IMAGE_UPLOAD_BYTES; 422 for a file that is not a
    usable image (naming it and why) or a target that is not one of the model's classes."""
    result = require_model(job)
    name = repr(filename[:100])
    if len(data) > settings.max_image_upload_bytes:
        raise ServiceError(
            ErrorCode.UPLOAD_TOO_LARGE,
            f"file {name} is {len(data)} bytes, over the limit of "
            f"{settings.max_image_upload_bytes} (MAX_IMAGE_UPLOAD_BYTES)",
        )
    try:
        image = decode_upload(data, settings.max_image_pixels)
    except ValueError as exc:
        raise ServiceError(ErrorCode.IMAGE_INVALID, f"file {name}: {exc}") from exc
    metadata = _metadata(store, result["metadata_key"])
    classes: list[str] = list(metadata["class_names"])
    if target is not None and target not in classes:
        shown = ", ".join(map(repr, classes[:50])) + (", ..." if len(classes) > 50 else "")
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR,
            f"target {target[:100]!r} is not one of the model's classes: {shown} "
            "(or leave it out to explain the predicted class)",
        )
    crop = crop_for_model(image, metadata)
    eid = queue.explanation_id(crop.tobytes(), crop.shape, target, result["safetensors_key"])
    existing = explanation_state(store, settings, slots, tenant, job.id, eid)
    if existing is not None:
        return existing
    key = queue.explanation_key(job.id, eid)
    png = io.BytesIO()
    Image.fromarray(crop).save(png, format="PNG")
    _put(store, f"{key}.input.png", png.getvalue())
    request = {"target": target, "filename": filename[:200], "at": time.time()}
    _put(store, f"{key}.request.json", json.dumps(request).encode())
    _remember(store, job.id, eid)
    _start(store, settings, slots, tenant, job.id, eid)
    return _public(job.id, eid, target, status="pending")

"""Datasets and models (the registry): one class per resource, one method per operation.
Jobs, which have more to them (events, waiting), are in `client/jobs.py`."""

from __future__ import annotations

import mimetypes
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from client import models as m
from client._http import ApiError, ProgressCallback, Transport
from client.uploads import counted, multipart

# An image to send: a path, raw bytes, or (file name, bytes).
Image = str | os.PathLike[str] | bytes | tuple[str, bytes]
UPLOAD_TIMEOUT = httpx.Timeout(60.0, read=900.0)  # the service ingests before it answers


def _drop_none(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


@contextmanager
def image_files(images: Sequence[Image], field: str) -> Iterator[list[tuple[str, Any]]]:
    """httpx's `files` for the images, opened for the request and closed after it."""
    with ExitStack() as stack:
        files: list[tuple[str, Any]] = []
        content: Any
        for i, image in enumerate(images):
            if isinstance(image, bytes):
                name, content = f"image-{i}", image
                mime = "application/octet-stream"
            elif isinstance(image, tuple):
                name, content = image
                mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
            else:
                path = Path(image)
                name = path.name
                content = stack.enter_context(open(path, "rb"))
                mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
            files.append((field, (name, content, mime)))
        yield files


def poll_pending(fetch: Any, first: httpx.Response, timeout: float, what: str) -> httpx.Response:
    """Ask again while the answer is 202 (rendering, explaining), as its Retry-After says."""
    deadline = time.monotonic() + timeout
    resp = first
    while resp.status_code == 202:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} was still pending after {timeout:.0f}s")
        time.sleep(min(float(resp.headers.get("Retry-After", 1) or 1), 2.0))
        resp = fetch()
    return resp


class Datasets:
    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def upload(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> m.Dataset:
        """Upload a zip, a tar (.tar, .tar.gz) or a folder (zipped while it streams).
        `progress(sent, total)` is called as the bytes go out."""
        body = multipart(Path(path), _drop_none(name=name))
        headers = {"Content-Type": body.content_type}
        if body.length is not None:
            headers["Content-Length"] = str(body.length)
        content = counted(body.chunks, body.expected, progress)
        return self._t.call(
            m.Dataset,
            "POST",
            "/v1/datasets",
            content=content,
            headers=headers,
            timeout=UPLOAD_TIMEOUT,
        )

    def import_(self, source: str, name: str | None = None) -> m.Dataset:
        """Register a dataset already in object storage (`s3://bucket/prefix`)."""
        body = _drop_none(source=source, name=name)
        return self._t.call(
            m.Dataset, "POST", "/v1/datasets/import", json=body, timeout=UPLOAD_TIMEOUT
        )

    def list(self, limit: int = 50, offset: int = 0) -> m.Datasets:
        params = {"limit": limit, "offset": offset}
        return self._t.call(m.Datasets, "GET", "/v1/datasets", params=params)

    def get(self, dataset_id: str) -> m.Dataset:
        return self._t.call(m.Dataset, "GET", f"/v1/datasets/{dataset_id}")

    def delete(self, dataset_id: str) -> None:
        self._t.request("DELETE", f"/v1/datasets/{dataset_id}")

    def samples_png(self, dataset_id: str) -> bytes:
        """A PNG grid of a few images per class."""
        return self._t.get_bytes(f"/v1/datasets/{dataset_id}/samples.png")

    def augmentation_preview(
        self,
        dataset_id: str,
        preset: str = "light",
        hflip: bool = True,
        image_size: int = 224,
        seed: int = 0,
        samples: int = 8,
        timeout: float = 120.0,
    ) -> bytes:
        """The PNG grid of augmented draws; waits while a worker renders it."""
        path = f"/v1/datasets/{dataset_id}/augmentations/preview"
        params = {
            "preset": preset,
            "hflip": str(hflip).lower(),
            "image_size": image_size,
            "seed": seed,
            "samples": samples,
        }

        def fetch() -> httpx.Response:
            return self._t.request("GET", path, params=params)

        return poll_pending(fetch, fetch(), timeout, "the augmentation preview").content


class Models:
    """The model registry: a reference is a model id, `name` (its latest version),
    `name@3` or `name@production`."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    def list(
        self,
        name: str | None = None,
        stage: str | None = None,
        tag: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> m.Models:
        params = _drop_none(name=name, stage=stage, tag=tag, limit=limit, offset=offset)
        return self._t.call(m.Models, "GET", "/v1/models", params=params)

    def get(self, ref: str) -> m.Model:
        return self._t.call(m.Model, "GET", f"/v1/models/{ref}")

    def update(
        self,
        ref: str,
        name: str | None = None,
        tags: Sequence[str] | None = None,
        stage: str | None = None,
    ) -> m.Model:
        body = _drop_none(name=name, tags=None if tags is None else list(tags), stage=stage)
        return self._t.call(m.Model, "PATCH", f"/v1/models/{ref}", json=body)

    def download(
        self,
        ref: str,
        dest: str | os.PathLike[str] | None = None,
        format: str = "zip",  # noqa: A002 - the API's name for it
        progress: ProgressCallback | None = None,
    ) -> Path:
        return self._t.download(
            f"/v1/models/{ref}/download",
            dest,
            params={"format": format},
            fallback_name=f"model.{format}",
            progress=progress,
        )

    def predict(self, ref: str, images: Sequence[Image], top_k: int = 5) -> m.Predictions:
        return predict(self._t, f"/v1/models/{ref}/predict", images, top_k)

    def explain(
        self, ref: str, image: Image, target: str | None = None, timeout: float = 120.0
    ) -> m.Explanation:
        """A Grad-CAM explanation, waited for (see `Jobs.explanation_image` for the PNG)."""
        return explain(self._t, f"/v1/models/{ref}/explain", image, target, timeout)


def predict(t: Transport, path: str, images: Sequence[Image], top_k: int) -> m.Predictions:
    if not images:
        raise ValueError("predict needs at least one image")
    with image_files(images, "files") as files:
        return t.call(m.Predictions, "POST", path, files=files, params={"top_k": top_k})


def explain(
    t: Transport, path: str, image: Image, target: str | None, timeout: float
) -> m.Explanation:
    with image_files([image], "file") as files:
        first = t.request("POST", path, files=files, data=_drop_none(target=target))
    done = m.Explanation.model_validate(first.json())
    status_path = f"/v1/jobs/{done.job_id}/explanations/{done.id}"
    deadline = time.monotonic() + timeout
    while done.status == "pending":  # 202 at first, then 200 with "pending" while it runs
        if time.monotonic() > deadline:
            raise TimeoutError(f"the explanation was still pending after {timeout:.0f}s")
        time.sleep(1.0)
        done = t.call(m.Explanation, "GET", status_path)
    if done.status == "failed":
        raise ApiError(200, "EXPLANATION_FAILED", done.error or "the explanation failed")
    return done


__all__ = ["Datasets", "Image", "Models"]

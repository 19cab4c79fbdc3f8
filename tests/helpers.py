"""Builders for the archives the tests upload."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


def noise_image(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def make_zip(files: Iterable[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files:
            zf.writestr(name, data)
    return buf.getvalue()


def imagefolder_zip(counts: dict[str, int], prefix: str = "") -> bytes:
    """A valid ImageFolder zip with `counts[class]` random PNGs per class."""
    files = []
    seed = 0
    for cls, n in counts.items():
        for i in range(n):
            seed += 1
            files.append((f"{prefix}{cls}/{i:03d}.png", png_bytes(noise_image(seed))))
    return make_zip(files)


def digits_samples(
    limit: int | None = None,
) -> tuple[list[tuple[np.ndarray, int]], list[tuple[np.ndarray, int]]]:
    """scikit-learn digits as uint8 8x8 images: (train, held_out), stratified 80/20."""
    from cli.demo import digits_split

    train, held_out = digits_split(seed=0)
    if limit is not None:
        train = train[:limit]
    return train, held_out


def digits_zip(samples: list[tuple[np.ndarray, int]]) -> bytes:
    return make_zip(
        (f"digits/{label}/{i:05d}.png", png_bytes(img)) for i, (img, label) in enumerate(samples)
    )


def ingest_bytes(data: bytes, out: Path, **limits: Any):
    """Run the real ingest on archive bytes; the canonical images zip lands at `out`."""
    from service.ingest import Limits, ingest_archive

    params = {"max_pixels": 10**6, "min_per_class": 2, **limits}
    return ingest_archive(io.BytesIO(data), out, Limits(**params))


def s3_client(env: dict[str, str]) -> Any:
    """A client for the test S3 endpoint (moto's server on loopback)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["S3_ENDPOINT_URL"],
        aws_access_key_id=env["S3_ACCESS_KEY_ID"],
        aws_secret_access_key=env["S3_SECRET_ACCESS_KEY"],
        region_name=env["S3_REGION"],
    )


def get_model(client: Any, job_id: str, fmt: str = "zip") -> Any:
    """GET /v1/jobs/{id}/model through the API client, following the 307 to the presigned
    S3 URL (which a TestClient cannot reach) with plain httpx, without the API key."""
    import httpx

    resp = client.get(f"/v1/jobs/{job_id}/model", params={"format": fmt}, follow_redirects=False)
    if resp.status_code == 307:
        return httpx.get(resp.headers["location"], timeout=60)
    return resp

"""Tests that train real models on the CPU: small datasets, a few epochs, minutes in all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import digits_samples, digits_zip, ingest_bytes


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> tuple[Path, dict[str, Any], Path]:
    """500 scikit-learn digits as an ingested archive: (archive, index, scratch folder).
    The image cache under `scratch / "cache"` is shared: a test that trains on a subset of
    the entries must prepare it into a folder of its own."""
    tmp = tmp_path_factory.mktemp("digits")
    train, _ = digits_samples(limit=500)
    archive = tmp / "images.zip"
    index = ingest_bytes(digits_zip(train), archive).index()
    return archive, index, tmp


@pytest.fixture(scope="session")
def few_digits(digits) -> tuple[Path, dict[str, Any], Path]:
    """100 of those digits (10 a class): enough to split, train and validate, in seconds.
    (archive, index, cache folder of its own)."""
    archive, index, tmp = digits
    kept, seen = [], {}
    for entry in index["entries"]:
        seen[entry["label"]] = seen.get(entry["label"], 0) + 1
        if seen[entry["label"]] <= 10:
            kept.append(entry)
    return archive, {**index, "entries": kept}, tmp / "few"

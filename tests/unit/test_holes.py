"""Holes from the attack review (issue 11) that need no servers: limits that hold, one
error body for every status, a readiness probe that neither races nor leaks paths."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy.exc
from fastapi import Body, FastAPI
from fastapi.testclient import TestClient

from core.models import Tenant
from core.storage import LocalObjectStore, StorageError
from core.tenancy import TenancyError, set_limits
from service.errors import install_error_handlers
from service.middleware import BodySizeLimit


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("rate_limit_per_minute", 0),
        ("rate_limit_per_minute", -5),
        ("max_running_jobs", 0),
        ("max_storage_bytes", -1),
        ("max_job_duration_seconds", 1.0),
        ("max_queued_jobs", True),
        ("max_queued_jobs", "12"),
    ],
)
def test_a_tenant_limit_outside_its_range_is_refused_naming_the_range(name, value):
    tenant = Tenant(id="tn_x", name="x")
    with pytest.raises(TenancyError, match=f"{name} must be between"):
        set_limits(tenant, **{name: value})
    assert getattr(tenant, name) is None


def test_tenant_limits_in_range_or_unset_are_accepted():
    tenant = Tenant(id="tn_x", name="x")
    set_limits(tenant, rate_limit_per_minute=1, max_storage_bytes=0, max_running_jobs=None)
    assert tenant.rate_limit_per_minute == 1 and tenant.max_storage_bytes == 0


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    def echo(body: dict = Body(...)) -> dict:  # noqa: B008
        return {"keys": len(body)}

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    @app.get("/pool")
    def pool() -> None:
        raise sqlalchemy.exc.TimeoutError("QueuePool limit of size 1 overflow 0 reached")

    app.add_middleware(BodySizeLimit, upload_max=10_000, other_max=100)
    return app


def test_a_chunked_json_body_over_the_limit_is_413_not_400():
    client = TestClient(_app())

    def chunks():
        for _ in range(10):
            yield b" " * 50

    answer = client.post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert answer.json()["error_code"] == "UPLOAD_TOO_LARGE"
    assert "MAX_JSON_BODY_BYTES" in answer.json()["detail"]


def test_a_chunked_json_body_under_the_limit_still_reaches_the_route():
    client = TestClient(_app())

    def chunks():
        yield b'{"a": 1,'
        yield b' "b": 2}'

    answer = client.post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 200 and answer.json() == {"keys": 2}


def test_an_unexpected_error_answers_the_json_error_body_without_internals():
    answer = TestClient(_app(), raise_server_exceptions=False).get("/boom")
    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error_code"] == "INTERNAL_ERROR"
    assert "secret" not in answer.text


def test_an_exhausted_database_pool_is_a_retryable_503_not_a_500():
    answer = TestClient(_app(), raise_server_exceptions=False).get("/pool")
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert answer.json()["error_code"] == "STORAGE_UNAVAILABLE"
    assert "QueuePool" not in answer.text


def test_concurrent_readiness_probes_of_the_local_store_all_pass(tmp_path: Path):
    store = LocalObjectStore(tmp_path)
    errors: list[Exception] = []
    barrier = threading.Barrier(48)

    def probe() -> None:
        barrier.wait()
        try:
            store.check()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=probe) for _ in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".probe")]


def test_an_unwritable_store_is_reported_without_its_path(tmp_path: Path, monkeypatch):
    store = LocalObjectStore(tmp_path / "objects")

    def refuse(self: Path, data: bytes) -> int:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", refuse)  # root ignores a read-only folder
    with pytest.raises(StorageError, match="not writable") as caught:
        store.check()
    assert str(tmp_path) not in str(caught.value)

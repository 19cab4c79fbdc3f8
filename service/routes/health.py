"""Liveness and readiness, unauthenticated for load balancers: they say whether each
dependency answers, never how it failed (addresses, versions and messages go to the log)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from core.queue import check_broker
from service.deps import SessionDep, SettingsDep, StoreDep

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up. Says nothing about its dependencies: see /readyz."""
    return {"status": "ok"}


def _check(name: str, probe: Callable[[], object]) -> str:
    try:
        probe()
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        # No traceback: a load balancer polls this every few seconds while it is down.
        log.warning("readiness check %s failed: %r", name, exc)
        return "error: unreachable"
    return "ok"


@router.get("/readyz")
def readyz(session: SessionDep, settings: SettingsDep, store: StoreDep) -> JSONResponse:
    """200 when the database, the broker and the object store all answer, else 503."""
    checks = {
        "database": _check("database", lambda: session.execute(text("SELECT 1"))),
        "broker": _check("broker", lambda: check_broker(settings)),
        "storage": _check("storage", store.check),
    }
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )

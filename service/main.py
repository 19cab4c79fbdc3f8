"""The FastAPI application. It never imports torch or worker code."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from core import async_reads
from core.logs import configure_logging
from core.reaper import Reaper
from core.settings import Settings, get_settings
from service.auth import Authenticate
from service.concurrency import (
    PREDICT_THREADS,
    PREVIEW_THREADS,
    TENANT_PREDICT_THREADS,
    TENANT_PREVIEW_THREADS,
    RenderSlots,
    TenantThreads,
    UploadSlots,
    database_threads,
    ingest_limiter,
)
from service.errors import install_error_handlers
from service.fastpath import FastJobPoll
from service.middleware import BodySizeLimit
from service.observability import RequestObservability, metrics_router
from service.routes import (
    admin,
    backbones,
    dashboard,
    datasets,
    events,
    explain,
    health,
    jobs,
    label_issues,
    models,
    predict,
    previews,
    webhooks,
)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings)

    @asynccontextmanager
    async def lifespan(instance: FastAPI) -> AsyncIterator[None]:
        log = logging.getLogger("finetune")
        for warning in settings.warnings():
            log.warning("%s", warning)
        connections = settings.db_pool_size + settings.db_max_overflow
        threads = database_threads(settings.ingest_threads)
        if connections < threads:
            log.warning(
                "DB_POOL_SIZE + DB_MAX_OVERFLOW (%d) is less than the %d threads that may "
                "use the database at once: under load, requests will wait for a connection, "
                "then answer 503",
                connections,
                threads,
            )
        reaper = Reaper(settings)
        reaper.start()
        instance.state.reads_on_loop = True  # PostgreSQL's polled reads (service/fastpath.py)
        yield
        instance.state.reads_on_loop = False
        reaper.stop()
        await async_reads.close_all()

    app = FastAPI(
        lifespan=lifespan,
        title="finetune",
        version="0.1.0",
        description="Upload labeled images, fine-tune a pretrained backbone, download the model.",
    )
    install_error_handlers(app)
    app.state.ingest_limiter = ingest_limiter(settings.ingest_threads)
    app.state.render_slots = RenderSlots(lost_after=previews.PREVIEW_RESEND_SECONDS)
    app.state.preview_threads = TenantThreads(TENANT_PREVIEW_THREADS, PREVIEW_THREADS)
    app.state.predict_threads = TenantThreads(TENANT_PREDICT_THREADS, PREDICT_THREADS)
    for router in (
        health.router,
        jobs.router,  # first after health: the routes clients poll are matched soonest
        previews.router,
        datasets.router,
        events.router,
        webhooks.router,
        webhooks.deliveries_router,
        label_issues.router,
        predict.router,
        models.router,
        explain.router,
        explain.models_router,
        backbones.router,
        admin.router,
        admin.me_router,
        dashboard.router,
        dashboard.page_router,
    ):
        app.include_router(router)
    app.include_router(metrics_router(settings))
    app.mount("/static", dashboard.static_files(), name="static")
    # The last added runs first: request id and metrics, CORS (when configured), then the
    # body limit, then auth, then the tenant's upload slots (which need the tenant that
    # auth found).
    app.add_middleware(FastJobPoll, router_app=app)  # innermost: the poll, after auth
    app.add_middleware(UploadSlots, per_tenant=settings.tenant_max_concurrent_uploads)
    app.add_middleware(Authenticate, settings=settings)
    app.add_middleware(
        BodySizeLimit,
        upload_max=settings.max_upload_bytes,
        other_max=settings.max_json_body_bytes,
        image_max=settings.max_image_upload_bytes,
        predict_max=settings.max_predict_body_bytes,
    )
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    # Outermost: request id and metrics for every answer, the middlewares' own included.
    app.add_middleware(RequestObservability, router_app=app)
    return app


app = create_app()

"""The FastAPI application. It never imports torch or worker code."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from core.reaper import Reaper
from core.settings import Settings, get_settings
from service.auth import Authenticate
from service.errors import install_error_handlers
from service.middleware import BodySizeLimit
from service.routes import admin, backbones, datasets, health, jobs, previews


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for warning in settings.warnings():
            logging.getLogger("finetune").warning("%s", warning)
        reaper = Reaper(settings)
        reaper.start()
        yield
        reaper.stop()

    app = FastAPI(
        lifespan=lifespan,
        title="finetune",
        version="0.1.0",
        description="Upload labeled images, fine-tune a pretrained backbone, download the model.",
    )
    install_error_handlers(app)
    for router in (
        health.router,
        previews.router,
        datasets.router,
        jobs.router,
        backbones.router,
        admin.router,
        admin.me_router,
    ):
        app.include_router(router)
    # The last added runs first: CORS (when configured), then the body limit, then auth.
    app.add_middleware(Authenticate, settings=settings)
    app.add_middleware(
        BodySizeLimit,
        upload_max=settings.max_upload_bytes,
        other_max=settings.max_json_body_bytes,
    )
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    return app


app = create_app()

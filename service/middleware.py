"""Refuse oversized request bodies before they are buffered anywhere."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ErrorCode, ServiceError, send_error


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """Dataset uploads may be up to `upload_max` bytes (MAX_UPLOAD_BYTES); one image posted
    to be explained up to `image_max` (MAX_IMAGE_UPLOAD_BYTES); the images of one
    prediction request up to `predict_max` (MAX_PREDICT_BODY_BYTES); every other request body
    (JSON) up to `other_max` (MAX_JSON_BODY_BYTES)."""

    UPLOAD_PATHS = ("/v1/datasets",)
    IMAGE_PATH_SUFFIXES = ("/explain",)
    PREDICT_PATH_SUFFIX = "/predict"

    def __init__(
        self,
        app: ASGIApp,
        upload_max: int,
        other_max: int,
        image_max: int | None = None,
        predict_max: int | None = None,
    ) -> None:
        self.app = app
        self.upload_max = upload_max
        self.other_max = other_max
        self.image_max = other_max if image_max is None else image_max
        self.predict_max = self.image_max if predict_max is None else predict_max

    async def _reject(self, send: Send, limit: int, setting: str) -> None:
        exc = ServiceError(
            ErrorCode.UPLOAD_TOO_LARGE,
            f"request body exceeds the limit of {limit} bytes ({setting})",
        )
        await send_error(send, exc, ((b"connection", b"close"),))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope.get("method") == "POST" and scope.get("path") in self.UPLOAD_PATHS
        limit = self.upload_max if upload else self.other_max
        setting = "MAX_UPLOAD_BYTES" if upload else "MAX_JSON_BODY_BYTES"
        path = str(scope.get("path") or "")
        if scope.get("method") == "POST" and path.endswith(self.IMAGE_PATH_SUFFIXES):
            limit, setting = self.image_max, "MAX_IMAGE_UPLOAD_BYTES"
        elif scope.get("method") == "POST" and path.endswith(self.PREDICT_PATH_SUFFIX):
            limit, setting = self.predict_max, "MAX_PREDICT_BODY_BYTES"
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._reject(send, limit, setting)
            return

        if not upload:
            await self._small_body(scope, receive, send, limit, setting)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send, limit, setting)

    async def _small_body(
        self, scope: Scope, receive: Receive, send: Send, limit: int, setting: str
    ) -> None:
        """Read a (JSON) body of at most `limit` bytes whole, then hand it on. Refusing it
        from inside the app would not work: FastAPI turns any error while it reads a body
        into a 400, and a chunked body has no Content-Length to refuse it by up front."""
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                await self._reject(send, limit, setting)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

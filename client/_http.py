"""The transport under every call: base URL, the API key, one error type, downloads that
follow the S3 redirect without the key, and the schema (to learn which routes exist)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

DEFAULT_URL = "http://127.0.0.1:8000"
CHUNK = 1 << 16
# An event stream may be quiet for a while; past this, the caller falls back to polling.
STREAM_TIMEOUT = httpx.Timeout(10.0, read=60.0)

# (bytes done, bytes in all or None when unknown)
ProgressCallback = Callable[[int, "int | None"], None]
M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """An error answer of the API, or no answer at all.

    `status` is the HTTP status (0: the server could not be reached or the connection
    broke); `error_code` the service's stable code (`JOB_NOT_FOUND`, `VALIDATION_ERROR`,
    ...; `UNREACHABLE` for status 0); `detail` the sentence for people."""

    def __init__(
        self,
        status: int,
        error_code: str,
        detail: str,
        errors: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {error_code}: {detail}" if status else detail)
        self.status = status
        self.error_code = error_code
        self.detail = detail
        self.errors = errors
        self.retry_after = retry_after

    @property
    def is_client_error(self) -> bool:
        """The request was wrong (4xx): retrying it as it is will not help."""
        return 400 <= self.status < 500

    @classmethod
    def from_response(cls, resp: httpx.Response) -> ApiError:
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "error_code" not in body:
            text = resp.text[:500].strip()
            body = {"error_code": f"HTTP_{resp.status_code}", "detail": text or resp.reason_phrase}
        retry = resp.headers.get("Retry-After")
        return cls(
            resp.status_code,
            str(body["error_code"]),
            str(body.get("detail", "")),
            body.get("errors"),
            float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
        )


def unreachable(url: str, exc: Exception) -> ApiError:
    return ApiError(0, "UNREACHABLE", f"could not reach the service at {url}: {exc}")


def filename_of(resp: httpx.Response, fallback: str) -> str:
    """The file name in Content-Disposition (RFC 6266, the plain form), else `fallback`."""
    found = re.search(r'filename="?([^";]+)"?', resp.headers.get("content-disposition", ""))
    name = found.group(1) if found else fallback
    return Path(name).name or fallback  # never a path the server chose


class Transport:
    """One HTTP connection pool to the service. `http` may be any `httpx.Client` (the tests
    pass FastAPI's TestClient); otherwise one is made for `base_url`."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("FINETUNE_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("FINETUNE_API_KEY")
        self.http = http or httpx.Client(base_url=self.base_url, timeout=timeout)
        # Sent with each request rather than set on `http`, which a caller may share.
        self.auth = {"Authorization": f"Bearer {key}"} if key else {}
        self._routes: set[tuple[str, str]] | None = None

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            headers = {**self.auth, **kwargs.pop("headers", {})}
            resp = self.http.request(method, path, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise unreachable(self.base_url, exc) from exc
        if resp.status_code >= 400:
            raise ApiError.from_response(resp)
        return resp

    def call(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return model.model_validate(self.request(method, path, **kwargs).json())

    def routes(self) -> set[tuple[str, str]]:
        """(METHOD, path template) of every operation the server's schema lists."""
        if self._routes is None:
            schema = self.request("GET", "/openapi.json").json()
            self._routes = {
                (method.upper(), path)
                for path, ops in schema.get("paths", {}).items()
                for method in ops
            }
        return self._routes

    def has_route(self, method: str, path: str) -> bool:
        try:
            return (method.upper(), path) in self.routes()
        except ApiError:
            return False

    def download(
        self,
        path: str,
        dest: str | os.PathLike[str] | None,
        *,
        params: dict[str, Any] | None = None,
        fallback_name: str = "download",
        progress: ProgressCallback | None = None,
    ) -> Path:
        """Stream a file to `dest` (a file, a folder, or None: the current folder under the
        server's file name). S3 storage answers 307 to a presigned URL, fetched without the
        API key, which must never leave for another host."""
        try:
            with self.http.stream(
                "GET", path, params=params, headers=self.auth, follow_redirects=False
            ) as resp:
                if resp.status_code in (301, 302, 303, 307, 308):
                    location = resp.headers["location"]
                    with (
                        httpx.Client(timeout=self.http.timeout) as plain,
                        plain.stream("GET", location) as far,
                    ):
                        return _save(far, dest, fallback_name, progress)
                return _save(resp, dest, fallback_name, progress)
        except httpx.TransportError as exc:
            raise unreachable(self.base_url, exc) from exc

    def get_bytes(self, path: str, params: dict[str, Any] | None = None) -> bytes:
        return self.request("GET", path, params=params).content

    def lines(self, path: str, headers: dict[str, str]) -> Iterator[str]:
        """The lines of a streamed answer (server-sent events), as they arrive."""
        try:
            with self.http.stream(
                "GET", path, headers={**self.auth, **headers}, timeout=STREAM_TIMEOUT
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise ApiError.from_response(resp)
                yield from resp.iter_lines()
        except httpx.TransportError as exc:
            raise unreachable(self.base_url, exc) from exc


def _save(
    resp: httpx.Response,
    dest: str | os.PathLike[str] | None,
    fallback_name: str,
    progress: ProgressCallback | None,
) -> Path:
    if resp.status_code >= 400:
        resp.read()
        raise ApiError.from_response(resp)
    target = Path(dest) if dest is not None else Path(".")
    if target.is_dir():
        target = target / filename_of(resp, fallback_name)
    total = int(resp.headers["content-length"]) if "content-length" in resp.headers else None
    partial = target.with_name(target.name + ".part")
    done = 0
    try:
        with open(partial, "wb") as out:
            for chunk in resp.iter_bytes(CHUNK):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)  # a broken download never leaves a file that looks whole
    return target.resolve()

"""All configuration, read once from the environment (or a `.env` file).

This is the only module that reads environment variables. Every name below is the
upper-cased field name (`database_url` -> `DATABASE_URL`); docker-compose.yml sets the
same names, and a test checks that they agree.
"""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path("var")
DATABASE_SCHEMES = ("sqlite://", "sqlite+", "postgresql://", "postgresql+", "postgres://")
BROKER_SCHEMES = {"redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp", "memory"}
S3_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # Where the embedded default keeps its SQLite files, local objects and caches.
    data_dir: Path = DEFAULT_DATA_DIR

    # Empty means "embedded default": SQLite / kombu-over-SQLite under data_dir.
    database_url: str = ""
    broker_url: str = ""
    task_queue: str = "finetune"
    # Short tasks that need torch but must not wait behind training (augmentation previews,
    # later explanations): their own queue, consumed by a light worker.
    light_queue: str = "finetune-light"
    # Training on a GPU: consumed by `finetune worker --gpus` (one worker per GPU). A job's
    # `device` picks it (auto: when a live worker consumes it); TASK_QUEUE is the CPU's.
    gpu_queue: str = "finetune-gpu"

    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path | None = None
    s3_endpoint_url: str | None = None
    s3_bucket: str = "finetune"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None

    # Upload and dataset limits.
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    min_images_per_class: int = Field(default=2, ge=1)
    max_archive_entries: int = Field(default=1_000_000, gt=0)
    max_dataset_bytes: int = Field(default=64 * 1024**3, gt=0)  # uncompressed image bytes
    max_compression_ratio: float = Field(default=200.0, gt=1.0)
    # Prefixes `POST /v1/datasets/import` may read from (s3://bucket/prefix); empty: none.
    # `{tenant}` in a prefix is the caller's tenant name: s3://imports/{tenant}/ gives each
    # tenant its own area, and no tenant can register another's objects.
    import_allowed_prefixes: list[str] = Field(default_factory=list)

    # Worker side.
    worker_cache_dir: Path | None = None
    # Past this, each worker evicts whole cached datasets, least recently used first (never
    # one a job or preview on this host is reading).
    worker_cache_max_bytes: int = Field(default=20 * 1024**3, gt=0)
    # Pretrained weights: an explicit folder of <backbone>.safetensors files, then the
    # torch hub and Hugging Face caches (the same variables torch and huggingface_hub read).
    weights_dir: Path | None = None
    torch_home: Path | None = None
    hf_home: Path | None = None
    hf_hub_cache: Path | None = None
    xdg_cache_home: Path | None = None
    # Off by default: a backbone is accepted only when its weights are on this host, so a
    # job never fails an hour later on an air-gapped machine. `finetune weights pull`.
    allow_weight_downloads: bool = False
    # A job with `gpus` > 1 on a worker without CUDA: off, it fails naming the reason (N
    # processes on one CPU are no faster); on, its ranks run on the CPU with gloo (tests).
    allow_cpu_distributed: bool = False
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    # A running job whose heartbeat is older than this is taken as lost: requeued (and
    # resumed from its last checkpoint) until it has had MAX_ATTEMPTS, then failed.
    stale_after_seconds: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    reaper_interval_seconds: float = Field(default=15.0, gt=0)
    # A job still `queued` this long after it was sent gets its task sent again, in case
    # the message was lost (a broker restart without persistence); duplicates are harmless.
    queued_resend_seconds: float = Field(default=3600.0, gt=0)
    progress_interval_seconds: float = Field(default=2.0, ge=0)
    dataloader_workers: int = Field(default=-1, ge=-1)  # -1: sized to the host
    # Per-job time limits. A job may ask for less (`max_duration_seconds`), never more.
    # Soft limit: the job stops at the next step, keeps its best model and ends
    # `failed TIME_LIMIT_EXCEEDED`. Hard limit (soft + grace): a job that has not stopped by
    # then (a hung step or storage call) is failed and its worker process killed; the
    # supervisor (compose `restart:`, the embedded `serve`) starts a fresh one.
    job_max_duration_seconds: float = Field(default=12 * 3600.0, ge=5.0)
    job_stop_grace_seconds: float = Field(default=300.0, ge=1.0)
    # Redis redelivers an unacknowledged task after this long. Keep it longer than the hard
    # limit: a redelivery is harmless (the job row lets only one copy train) but wasteful.
    broker_visibility_timeout_seconds: int = Field(default=24 * 3600, gt=0)

    # Tenants and API keys. Off only when asked for: every request then acts as the
    # "default" tenant with every scope (a single-user install behind its own gate).
    auth_enabled: bool = True
    # Limits per tenant; a tenant's own values (`finetune tenants set`) override these.
    tenant_max_running_jobs: int = Field(default=2, ge=1)
    tenant_max_queued_jobs: int = Field(default=20, ge=1)
    tenant_max_storage_bytes: int = Field(default=100 * 1024**3, ge=0)
    rate_limit_per_minute: int = Field(default=600, ge=1)
    # Where the rate limit counts requests: every API process against one Redis counter per
    # tenant (redis://...), or each process in its own memory (`memory://`). Empty: the
    # broker's Redis when BROKER_URL is redis://, else memory (the embedded default).
    rate_limit_storage_url: str = ""
    # Verified API keys (with their tenant's limits) are kept this long in each API process:
    # a key revoked or a limit changed elsewhere (the CLI, another replica) takes effect
    # within it; through this process's admin routes, at once. 0: look every key up.
    auth_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    # A job whose tenant is at its running-jobs limit waits this long before trying again.
    tenant_slot_retry_seconds: float = Field(default=15.0, gt=0)
    # Heavy requests, per tenant and per API process: uploads and imports ingesting at once,
    # and augmentation previews rendering at once; past either, 429 RATE_LIMITED.
    tenant_max_concurrent_uploads: int = Field(default=2, ge=1)
    tenant_max_rendering_previews: int = Field(default=4, ge=1)
    # Rendered previews kept per dataset; past it the oldest are deleted (rendered again
    # when asked for). Keep it above TENANT_MAX_RENDERING_PREVIEWS.
    max_previews_per_dataset: int = Field(default=32, ge=1)
    # Threads that decode uploads, apart from the ones that answer every other request
    # (twice the per-tenant cap: one tenant's uploads cannot hold up every other's).
    ingest_threads: int = Field(default=4, ge=1)
    # Database connections per process. The API may do database work on 40 threads
    # (anyio's pool) + INGEST_THREADS + 8 (previews) + 1 (reaper) at once: size + overflow
    # should cover them. A request that waits DB_POOL_TIMEOUT_SECONDS for one answers 503.
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=50, ge=0)
    db_pool_timeout_seconds: float = Field(default=10.0, gt=0)
    # Request bodies other than dataset uploads (JSON) are refused past this.
    max_json_body_bytes: int = Field(default=1024**2, gt=0)
    # One image posted to be explained (or predicted): the encoded file, before decoding
    # (whose pixels MAX_IMAGE_PIXELS bounds, as at ingest).
    max_image_upload_bytes: int = Field(default=20 * 1024**2, gt=0)
    # Hosted predictions (onnxruntime in the API process): images per request, loaded
    # models kept (an LRU), and onnxruntime's threads per model (0: one per core).
    predict_max_images: int = Field(default=32, ge=1, le=1024)
    # The whole multipart body of one prediction request (each file is also held to
    # MAX_IMAGE_UPLOAD_BYTES; decoded images are cropped one at a time).
    max_predict_body_bytes: int = Field(default=64 * 1024**2, gt=0)
    predict_cache_models: int = Field(default=8, ge=1, le=1024)
    predict_threads: int = Field(default=0, ge=0, le=256)
    # Let those threads busy-wait between runs (onnxruntime's default): about 1.5 ms less
    # per prediction, for cores that spin after each one. For hosts whose spare cores
    # serve predictions; off, the threads sleep and leave the cores to everything else.
    predict_spin: bool = False
    # Model downloads from S3 are short-lived presigned GET URLs; PUBLIC_ENDPOINT is the
    # address clients reach S3 at when it differs from the workers' (e.g. in compose).
    download_url_ttl_seconds: int = Field(default=300, ge=10, le=7 * 24 * 3600)
    s3_public_endpoint_url: str | None = None
    # Browser origins allowed to call the API (CORS); empty: no CORS headers at all.
    cors_allow_origins: list[str] = Field(default_factory=list)
    # Proxies whose X-Forwarded-For/-Proto are believed: comma-separated addresses or
    # networks (10.0.0.0/8), `*` for any peer. Empty: none, not even loopback, so the audit
    # log records the peer that connected, never an address a client claims.
    forwarded_allow_ips: str = ""
    # Webhooks (core/webhooks.py): private, loopback and link-local targets are refused
    # unless allowed (tests; an intranet); tries per delivery, backoff doubling from BACKOFF.
    webhook_allow_private: bool = False
    webhook_max_attempts: int = Field(default=8, ge=1, le=50)
    webhook_backoff_seconds: float = Field(default=10.0, gt=0)
    webhook_backoff_max_seconds: float = Field(default=3600.0, gt=0)
    webhook_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # Live events (GET /v1/jobs/{id}/events): poll period, then the stream ends after MAX
    # and the client reconnects with Last-Event-ID.
    events_poll_seconds: float = Field(default=1.0, ge=0.05, le=30)
    events_max_stream_seconds: float = Field(default=300.0, ge=1, le=24 * 3600)

    # `finetune serve`'s embedded worker children: one that dies is started again after a
    # backoff (1 s, doubling, at most 30 s); more than WORKER_MAX_RESTARTS deaths within
    # WORKER_RESTART_WINDOW_SECONDS is a crash loop, and that worker is given up on.
    worker_max_restarts: int = Field(default=5, ge=0, le=1000)
    worker_restart_window_seconds: float = Field(default=600.0, gt=0)
    # How long a stopping `serve` waits for its open requests, and then for its worker
    # children to hand their jobs back, before it kills them and everything they started.
    stop_grace_seconds: float = Field(default=30.0, gt=0, le=3600)

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one object a line (core/logs.py)
    # The API's /metrics (METRICS_TOKEN: the bearer it wants), each worker's port (0: off),
    # and prometheus-client's folder, set by `serve --workers N` (service/observability.py).
    metrics_enabled: bool = True
    metrics_token: str = ""
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    prometheus_multiproc_dir: Path | None = None

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, v: str, info: ValidationInfo) -> str:
        levels = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
        if v.upper() not in levels:
            raise ValueError(f"LOG_LEVEL={v!r} is not one of {sorted(levels)}")
        return v.upper()

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, v: str) -> str:
        if v and not v.startswith(DATABASE_SCHEMES):
            raise ValueError(
                f"DATABASE_URL={v!r}: expected a sqlite:/// or postgresql+psycopg:// URL"
            )
        if v.startswith("postgresql://") or v.startswith("postgres://"):
            # SQLAlchemy would pick psycopg2, which we do not install.
            v = "postgresql+psycopg://" + v.split("://", 1)[1]
        return v

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, v: str) -> str:
        scheme = v.split("://", 1)[0] if "://" in v else None
        if v and (scheme is None or not (scheme in BROKER_SCHEMES or scheme.startswith("sqla+"))):
            raise ValueError(
                f"BROKER_URL={v!r}: expected a redis://, rediss://, amqp:// or sqla+ URL "
                "(empty: the embedded SQLite broker)"
            )
        return v

    @field_validator("task_queue", "light_queue", "gpu_queue")
    @classmethod
    def _queue_name(cls, v: str, info: ValidationInfo) -> str:
        # Workers get `-Q a,b`: a comma or a space would make two queues of one name.
        if not re.fullmatch(r"[A-Za-z0-9._:@-]{1,200}", v):
            raise ValueError(
                f"{str(info.field_name).upper()}={v!r}: a queue name is 1-200 letters, "
                "digits or . _ : @ - (no spaces or commas)"
            )
        return v

    @field_validator("s3_bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        if not S3_BUCKET_NAME.fullmatch(v):
            raise ValueError(
                f"S3_BUCKET={v!r} is not a valid bucket name (3-63 lower-case letters, "
                "digits, dots and hyphens, starting and ending with a letter or digit)"
            )
        return v

    @field_validator("s3_region")
    @classmethod
    def _region(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("S3_REGION is empty")
        return v

    @field_validator("s3_endpoint_url", "s3_public_endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None, info: ValidationInfo) -> str | None:
        if not v:
            return None  # an empty variable means "not set"
        url = urlsplit(v)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(
                f"{str(info.field_name).upper()}={v!r}: expected http(s)://host[:port]"
            )
        return v

    @field_validator("import_allowed_prefixes")
    @classmethod
    def _import_prefixes(cls, v: list[str]) -> list[str]:
        for prefix in v:
            bucket = prefix[len("s3://") :].split("/", 1)[0]
            # `s3://` alone (or a bucket with a {tenant} in it) would open every bucket.
            if not prefix.startswith("s3://") or not S3_BUCKET_NAME.fullmatch(bucket):
                raise ValueError(
                    f"IMPORT_ALLOWED_PREFIXES: {prefix!r} is not s3://BUCKET/[PREFIX] "
                    "with a valid bucket name"
                )
        return v

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            url = urlsplit(origin)
            exact = url.scheme in ("http", "https") and url.hostname and not url.path
            # Browsers send the origin without a path: "https://a.example/" never matches.
            if origin != "*" and not (exact and not url.query and not url.fragment):
                raise ValueError(
                    f"CORS_ALLOW_ORIGINS: {origin!r} is not an origin "
                    "(scheme://host[:port], no path or trailing slash) or *"
                )
        return v

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxies(cls, v: str) -> str:
        items = [item.strip() for item in v.split(",") if item.strip()]
        for item in items:
            try:
                if item != "*":
                    ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"FORWARDED_ALLOW_IPS: {item!r} is not an IP address, a network "
                    "(10.0.0.0/8) or *"
                ) from None
        return ",".join(items)

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if self.task_queue == self.light_queue:
            raise ValueError(
                f"TASK_QUEUE and LIGHT_QUEUE are both {self.task_queue!r}: previews would "
                "wait behind training jobs; give them different names"
            )
        if self.gpu_queue in (self.task_queue, self.light_queue):
            raise ValueError(
                f"GPU_QUEUE is {self.gpu_queue!r}, the name of another queue: a job for a GPU "
                "could land on a CPU worker; give it a name of its own"
            )
        if bool(self.s3_access_key_id) != bool(self.s3_secret_access_key):
            raise ValueError(
                "S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY are set together or not at all"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        # abspath, not resolve(): no system call, and this runs on every request
        return self.database_url or f"sqlite:///{os.path.abspath(self.data_dir / 'finetune.db')}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        return self.storage_dir or self.data_dir / "objects"

    @property
    def resolved_worker_cache_dir(self) -> Path:
        return self.worker_cache_dir or self.data_dir / "cache"

    @property
    def resolved_torch_hub_dir(self) -> Path:
        cache = self.xdg_cache_home or Path.home() / ".cache"
        return (self.torch_home or cache / "torch") / "hub"

    @property
    def resolved_hf_cache(self) -> Path:
        if self.hf_hub_cache:
            return self.hf_hub_cache
        cache = self.xdg_cache_home or Path.home() / ".cache"
        return (self.hf_home or cache / "huggingface") / "hub"

    @property
    def job_hard_limit_seconds(self) -> float:
        return self.job_max_duration_seconds + self.job_stop_grace_seconds

    def warnings(self) -> list[str]:
        """Settings that work but defeat their purpose; logged when a process starts."""
        found = []
        if self.broker_visibility_timeout_seconds <= self.job_hard_limit_seconds:
            found.append(
                f"BROKER_VISIBILITY_TIMEOUT_SECONDS ({self.broker_visibility_timeout_seconds}) "
                f"is not longer than the hard job limit ({self.job_hard_limit_seconds:.0f}s = "
                "JOB_MAX_DURATION_SECONDS + JOB_STOP_GRACE_SECONDS): Redis will redeliver "
                "running jobs' tasks; the job row keeps them from training twice"
            )
        if self.stale_after_seconds <= 2 * self.heartbeat_seconds:
            found.append(
                f"STALE_AFTER_SECONDS ({self.stale_after_seconds}) should be more than twice "
                f"HEARTBEAT_SECONDS ({self.heartbeat_seconds}): one late beat would requeue a "
                "live job"
            )
        if self.webhook_allow_private:
            found.append(
                "WEBHOOK_ALLOW_PRIVATE=true: tenants' webhooks may reach loopback and private "
                "addresses of this network (the API, the database, cloud metadata)"
            )
        return found

    @property
    def embedded(self) -> bool:
        return not self.database_url and not self.broker_url and self.storage_backend == "local"


def weights_paths(settings: Settings) -> tuple[Path | None, Path, Path]:
    """(WEIGHTS_DIR, torch hub dir, Hugging Face cache): where weights are looked for, as the
    plain paths `worker.training.weights` takes."""
    return settings.weights_dir, settings.resolved_torch_hub_dir, settings.resolved_hf_cache


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""Tenants, API keys, per-tenant limits and the audit log: shared by the HTTP routes, the
auth middleware, the worker (running-jobs limit) and `finetune keys|tenants`."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.db import utcnow
from core.models import DEFAULT_TENANT, ApiKey, AuditEvent, Dataset, Job, JobStatus, Tenant
from core.settings import Settings

# `admin` manages its own tenant (keys, audit log); `operator` manages every tenant and is
# held only by keys of the default tenant.
SCOPES = ("read", "write", "admin", "operator")
TOKEN_RE = re.compile(r"^ft_([0-9a-f]{16})_([A-Za-z0-9_-]{20,64})$")
ACTIVE = (JobStatus.QUEUED.value, JobStatus.INTERRUPTED.value)


class TenancyError(ValueError):
    """A bad request to the tenancy layer (unknown tenant, bad scope, duplicate name)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: their tenant, key and scopes."""

    tenant_id: str
    key_id: str | None
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        return scope in self.scopes


# AUTH_ENABLED=false: every request is the default tenant with every scope.
ANONYMOUS = Principal(DEFAULT_TENANT, None, frozenset(SCOPES))


@dataclass(frozen=True)
class Limits:
    max_running_jobs: int
    max_queued_jobs: int
    max_storage_bytes: int
    max_job_duration_seconds: float
    rate_limit_per_minute: int


def limits_for(tenant: Tenant | None, settings: Settings) -> Limits:
    def pick(own: Any, default: Any) -> Any:
        return default if own is None else own

    t = tenant
    return Limits(
        max_running_jobs=pick(t and t.max_running_jobs, settings.tenant_max_running_jobs),
        max_queued_jobs=pick(t and t.max_queued_jobs, settings.tenant_max_queued_jobs),
        max_storage_bytes=pick(t and t.max_storage_bytes, settings.tenant_max_storage_bytes),
        # Never above the service's own ceiling.
        max_job_duration_seconds=min(
            pick(t and t.max_job_duration_seconds, settings.job_max_duration_seconds),
            settings.job_max_duration_seconds,
        ),
        rate_limit_per_minute=pick(t and t.rate_limit_per_minute, settings.rate_limit_per_minute),
    )


def tenant_limits(session: Session, tenant_id: str, settings: Settings) -> Limits:
    return limits_for(session.get(Tenant, tenant_id), settings)


def storage_used(session: Session, tenant_id: str) -> int:
    return int(
        session.scalar(
            select(func.coalesce(func.sum(Dataset.stored_bytes), 0)).where(
                Dataset.tenant_id == tenant_id, Dataset.deleted_at.is_(None)
            )
        )
        or 0
    )


def storage_overrun(
    session: Session, tenant_id: str, limit: int, adding: int, slack: int = 0
) -> str | None:
    """Why adding `adding` bytes of datasets would break the tenant's storage limit, or None.
    `slack`: bytes of the announced size that are not data (multipart framing)."""
    used = storage_used(session, tenant_id)
    if used + adding - slack <= limit:
        return None
    return (
        f"this dataset ({adding} bytes) would take your datasets to {used + adding} bytes, "
        f"over your tenant's storage limit of {limit} bytes (max_storage_bytes); delete "
        "datasets you no longer need or ask an admin to raise the limit"
    )


def count_jobs(session: Session, tenant_id: str, statuses: tuple[str, ...]) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.tenant_id == tenant_id, Job.status.in_(statuses))
        )
        or 0
    )


def usage(session: Session, tenant_id: str) -> dict[str, int]:
    return {
        "running_jobs": count_jobs(session, tenant_id, (JobStatus.RUNNING.value,)),
        "queued_jobs": count_jobs(session, tenant_id, ACTIVE),
        "storage_bytes": storage_used(session, tenant_id),
    }


# --- tenants and keys ------------------------------------------------------------------


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def get_tenant(session: Session, ref: str) -> Tenant | None:
    """By id or by name."""
    return session.get(Tenant, ref) or session.scalar(select(Tenant).where(Tenant.name == ref))


LIMIT_FIELDS = (
    "max_running_jobs",
    "max_queued_jobs",
    "max_storage_bytes",
    "max_job_duration_seconds",
    "rate_limit_per_minute",
)


def create_tenant(session: Session, name: str, **limits: Any) -> Tenant:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,99}", name):
        raise TenancyError(
            f"tenant name {name!r} must be 1-100 characters of a-z, 0-9, '_', '.', '-', "
            "starting with a letter or digit"
        )
    if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise TenancyError(f"a tenant named {name!r} exists already")
    tenant = Tenant(id=f"tn_{secrets.token_hex(8)}", name=name)
    set_limits(tenant, **limits)
    session.add(tenant)
    session.flush()
    return tenant


# The accepted range of each limit, for every way of setting one (CLI, HTTP, code): a value
# outside it (a rate limit of 0, say) would make every request of the tenant fail.
LIMIT_RANGES: dict[str, tuple[float, float]] = {
    "max_running_jobs": (1, 10_000),
    "max_queued_jobs": (1, 1_000_000),
    "max_storage_bytes": (0, 10**15),
    "max_job_duration_seconds": (5.0, 365 * 24 * 3600.0),
    "rate_limit_per_minute": (1, 1_000_000),
}


def set_limits(tenant: Tenant, **limits: Any) -> None:
    """Set a tenant's own limits; None goes back to the service's default."""
    unknown = set(limits) - set(LIMIT_FIELDS)
    if unknown:
        raise TenancyError(f"unknown limit(s) {sorted(unknown)}; known: {', '.join(LIMIT_FIELDS)}")
    for name, value in limits.items():
        lo, hi = LIMIT_RANGES[name]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi
        ):
            raise TenancyError(
                f"{name} must be between {lo:g} and {hi:g} (or unset); got {value!r}"
            )
    for name, value in limits.items():
        setattr(tenant, name, value)


def disable_tenant(session: Session, tenant: Tenant) -> int:
    """Revoke every key of `tenant` and refuse new ones. Returns how many were revoked."""
    if tenant.id == DEFAULT_TENANT:
        raise TenancyError("the default tenant holds the operator keys and cannot be disabled")
    now = utcnow()
    tenant.disabled_at = tenant.disabled_at or now
    keys = session.scalars(
        select(ApiKey).where(ApiKey.tenant_id == tenant.id, ApiKey.revoked_at.is_(None))
    ).all()
    for key in keys:
        key.revoked_at = now
    return len(keys)


def create_key(
    session: Session, tenant: Tenant, scopes: list[str], name: str = ""
) -> tuple[ApiKey, str]:
    """A new key for `tenant`; returns (row, token). The token is shown once, never stored."""
    if tenant.disabled_at is not None:
        raise TenancyError(f"tenant {tenant.name!r} is disabled: it gets no new keys")
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise TenancyError(
            f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {scopes}"
        )
    if "operator" in scopes and tenant.id != DEFAULT_TENANT:
        raise TenancyError(
            f"the operator scope is for keys of the {DEFAULT_TENANT!r} tenant only, not of "
            f"{tenant.name!r}; give this tenant's administrator `admin`"
        )
    key_id = secrets.token_hex(8)
    token = f"ft_{key_id}_{secrets.token_urlsafe(32)}"
    key = ApiKey(
        id=key_id,
        tenant_id=tenant.id,
        name=name or f"key for {tenant.name}",
        key_hash=_hash(token),
        scopes=sorted(set(scopes), key=SCOPES.index),
    )
    session.add(key)
    session.flush()
    return key, token


def revoke_key(session: Session, key_id: str) -> ApiKey | None:
    key = session.get(ApiKey, key_id)
    if key is not None and key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


class AuthFailure(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse_token(authorization: str | None) -> tuple[str, str]:
    """(key id, token) of an `Authorization: Bearer ft_...` header, checked without the
    database, or AuthFailure saying what is wrong with its form."""
    if not authorization:
        raise AuthFailure("missing API key: send `Authorization: Bearer ft_...`")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthFailure("malformed Authorization header: expected `Bearer ft_...`")
    match = TOKEN_RE.match(token)
    if match is None:
        raise AuthFailure("malformed API key: expected `ft_<16 hex>_<secret>`")
    return match.group(1), token


def _checked(key: ApiKey | None, token: str) -> ApiKey:
    if key is None or not hmac.compare_digest(key.key_hash, _hash(token)):
        raise AuthFailure("invalid API key")
    if key.revoked_at is not None:
        raise AuthFailure("this API key has been revoked")
    return key


def _touch(session: Session, key: ApiKey) -> None:
    """Record when the key was last used, at most once a minute (a write per request would
    make every read a write)."""
    now = utcnow()
    last = key.last_used_at
    if last is None or (now - (last if last.tzinfo else last.replace(tzinfo=now.tzinfo))) > (
        timedelta(minutes=1)
    ):
        key.last_used_at = now
        session.commit()


def resolve_token(session: Session, authorization: str | None) -> tuple[Principal, ApiKey]:
    """The principal behind an `Authorization: Bearer ft_...` header, or AuthFailure saying
    what is wrong (missing, malformed, unknown, revoked), never which keys exist."""
    key_id, token = parse_token(authorization)
    key = _checked(session.get(ApiKey, key_id), token)
    _touch(session, key)
    return Principal(key.tenant_id, key.id, frozenset(key.scopes)), key


def authenticate(
    session: Session, authorization: str | None, settings: Settings
) -> tuple[Principal, Limits]:
    """resolve_token and tenant_limits in one query (the key joined to its tenant): what the
    API's auth middleware does for every key it has not verified in the last few seconds."""
    key_id, token = parse_token(authorization)
    row = session.execute(
        select(ApiKey, Tenant)
        .outerjoin(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.id == key_id)
    ).first()
    key = _checked(row[0] if row else None, token)
    _touch(session, key)
    principal = Principal(key.tenant_id, key.id, frozenset(key.scopes))
    return principal, limits_for(row[1] if row else None, settings)


def ensure_bootstrap_key(session: Session) -> str | None:
    """First start with auth on and no operator key: create one (every scope) for the
    default tenant and return its token (to be printed once). None when one exists already."""
    keys = session.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None))).all()
    if any("operator" in k.scopes for k in keys):
        return None
    tenant = session.get(Tenant, DEFAULT_TENANT)
    assert tenant is not None, "migrations create the default tenant"
    key, token = create_key(session, tenant, list(SCOPES), name="bootstrap operator key")
    audit(session, None, "key.create", "key", key.id, detail={"scopes": key.scopes, "by": "serve"})
    session.commit()
    return token


# --- audit -------------------------------------------------------------------------------


def audit(
    session: Session,
    principal: Principal | None,
    action: str,
    object_type: str,
    object_id: str | None,
    client: str | None = None,
    detail: dict[str, Any] | None = None,
    tenant_id: str | None = None,
) -> None:
    """Add an audit row to the session; the caller's commit makes it durable with the change."""
    session.add(
        AuditEvent(
            tenant_id=tenant_id or (principal.tenant_id if principal else None),
            key_id=principal.key_id if principal else None,
            action=action,
            object_type=object_type,
            object_id=object_id,
            client=client,
            detail=detail or {},
        )
    )

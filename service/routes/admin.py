"""Tenants, API keys and the audit log (`admin` scope), and `GET /v1/me` for any key."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from core.db import as_utc
from core.models import ApiKey, AuditEvent, Tenant
from core.settings import Settings
from core.tenancy import (
    TenancyError,
    audit,
    create_key,
    create_tenant,
    disable_tenant,
    get_tenant,
    limits_for,
    revoke_key,
    set_limits,
    usage,
)
from service.deps import (
    AdminDep,
    Offset,
    PathId,
    QueryId,
    ReadDep,
    SessionDep,
    SettingsDep,
    client_of,
    page,
)
from service.errors import ERROR_RESPONSES, ErrorCode, ServiceError
from service.schemas import (
    AuditEventPublic,
    AuditEventsPublic,
    KeyCreate,
    KeyCreated,
    KeyPublic,
    KeysPublic,
    MePublic,
    TenantCreate,
    TenantLimits,
    TenantLimitsUpdate,
    TenantPublic,
    TenantsPublic,
    TenantUsage,
)

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=ERROR_RESPONSES)
me_router = APIRouter(prefix="/v1", tags=["admin"], responses=ERROR_RESPONSES)


def tenant_public(session: SessionDep, tenant: Tenant, settings: Settings) -> TenantPublic:
    return TenantPublic(
        id=tenant.id,
        name=tenant.name,
        created_at=as_utc(tenant.created_at),  # type: ignore[arg-type]
        disabled_at=as_utc(tenant.disabled_at),
        limits=TenantLimits(**asdict(limits_for(tenant, settings))),
        usage=TenantUsage(**usage(session, tenant.id)),
    )


def key_public(key: ApiKey) -> KeyPublic:
    return KeyPublic(
        id=key.id,
        tenant_id=key.tenant_id,
        name=key.name,
        scopes=list(key.scopes),
        created_at=as_utc(key.created_at),  # type: ignore[arg-type]
        revoked_at=as_utc(key.revoked_at),
        last_used_at=as_utc(key.last_used_at),
    )


def _tenant(session: SessionDep, ref: str) -> Tenant:
    tenant = get_tenant(session, ref)
    if tenant is None:
        raise ServiceError(ErrorCode.TENANT_NOT_FOUND, f"tenant {ref!r} not found")
    return tenant


def _audit_tenant(
    session: SessionDep,
    principal: AdminDep,
    request: Request,
    action: str,
    tenant: Tenant,
    detail: dict[str, Any],
) -> None:
    audit(
        session,
        principal,
        f"tenant.{action}",
        "tenant",
        tenant.id,
        client_of(request),
        detail,
        tenant_id=tenant.id,  # the tenant acted on, not the admin's own
    )


@me_router.get("/me", response_model=MePublic)
def read_me(principal: ReadDep, session: SessionDep, settings: SettingsDep) -> MePublic:
    """Who this key is: its tenant, scopes, the limits in force and what is used of them."""
    tenant = _tenant(session, principal.tenant_id)
    return MePublic(
        tenant_id=tenant.id,
        tenant_name=tenant.name,
        key_id=principal.key_id,
        scopes=sorted(principal.scopes),
        auth_enabled=settings.auth_enabled,
        limits=TenantLimits(**asdict(limits_for(tenant, settings))),
        usage=TenantUsage(**usage(session, tenant.id)),
    )


@router.post("/tenants", status_code=201, response_model=TenantPublic)
def create_tenant_route(
    request: Request,
    body: TenantCreate,
    principal: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
) -> TenantPublic:
    limits = body.model_dump(exclude={"name"}, exclude_none=True)
    try:
        tenant = create_tenant(session, body.name, **limits)
    except TenancyError as exc:
        raise ServiceError(ErrorCode.TENANT_EXISTS, str(exc)) from exc
    _audit_tenant(session, principal, request, "create", tenant, limits)
    session.commit()
    return tenant_public(session, tenant, settings)


@router.get("/tenants", response_model=TenantsPublic)
def list_tenants(
    principal: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> TenantsPublic:
    rows, count = page(session, Tenant, [], (Tenant.name,), limit, offset)
    return TenantsPublic(data=[tenant_public(session, t, settings) for t in rows], count=count)


@router.patch("/tenants/{tenant}", response_model=TenantPublic)
def update_tenant_limits(
    request: Request,
    tenant: PathId,
    body: TenantLimitsUpdate,
    principal: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
) -> TenantPublic:
    """Set a tenant's limits; a field sent as null goes back to the service's default."""
    row = _tenant(session, tenant)
    changes = body.model_dump(exclude_unset=True)
    set_limits(row, **changes)
    _audit_tenant(session, principal, request, "update", row, changes)
    session.commit()
    return tenant_public(session, row, settings)


@router.delete("/tenants/{tenant}", response_model=TenantPublic)
def disable_tenant_route(
    request: Request,
    tenant: PathId,
    principal: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
) -> TenantPublic:
    """Disable a tenant: all its keys are revoked (401 from now on) and it gets no new
    ones. Its datasets, jobs and models are kept; jobs already queued still run."""
    row = _tenant(session, tenant)
    try:
        revoked = disable_tenant(session, row)
    except TenancyError as exc:
        raise ServiceError(ErrorCode.TENANT_PROTECTED, str(exc)) from exc
    _audit_tenant(session, principal, request, "disable", row, {"keys_revoked": revoked})
    session.commit()
    return tenant_public(session, row, settings)


@router.post("/keys", status_code=201, response_model=KeyCreated)
def create_key_route(
    request: Request, body: KeyCreate, principal: AdminDep, session: SessionDep
) -> KeyCreated:
    """A new API key for a tenant. The token is in this response only."""
    tenant = _tenant(session, body.tenant)
    try:
        key, token = create_key(session, tenant, list(body.scopes), body.name)
    except TenancyError as exc:
        raise ServiceError(ErrorCode.TENANT_DISABLED, str(exc)) from exc
    audit(
        session,
        principal,
        "key.create",
        "key",
        key.id,
        client_of(request),
        {"scopes": key.scopes, "for_tenant": tenant.id},
        tenant_id=tenant.id,
    )
    session.commit()
    return KeyCreated(**key_public(key).model_dump(), key=token)


@router.get("/keys", response_model=KeysPublic)
def list_keys(
    principal: AdminDep,
    session: SessionDep,
    tenant: QueryId = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> KeysPublic:
    where = [] if tenant is None else [ApiKey.tenant_id == _tenant(session, tenant).id]
    order = (ApiKey.created_at.desc(), ApiKey.id)
    rows, count = page(session, ApiKey, where, order, limit, offset)
    return KeysPublic(data=[key_public(k) for k in rows], count=count)


@router.delete("/keys/{key_id}", status_code=204, response_class=Response)
def revoke_key_route(
    request: Request, key_id: PathId, principal: AdminDep, session: SessionDep
) -> Response:
    """Revoke a key: from now on it gets 401. Revoking twice is harmless."""
    key = revoke_key(session, key_id)
    if key is None:
        raise ServiceError(ErrorCode.KEY_NOT_FOUND, f"API key {key_id!r} not found")
    audit(
        session,
        principal,
        "key.revoke",
        "key",
        key.id,
        client_of(request),
        tenant_id=key.tenant_id,
    )
    session.commit()
    return Response(status_code=204)


@router.get("/audit", response_model=AuditEventsPublic)
def list_audit_events(
    principal: AdminDep,
    session: SessionDep,
    tenant: QueryId = None,
    action: QueryId = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> AuditEventsPublic:
    """Newest first: key and tenant changes, dataset and job creation and deletion, cancels,
    model downloads; each with the key that did it and the client address."""
    where = []
    if tenant is not None:
        where.append(AuditEvent.tenant_id == _tenant(session, tenant).id)
    if action is not None:
        where.append(AuditEvent.action == action)
    rows, count = page(session, AuditEvent, where, (AuditEvent.id.desc(),), limit, offset)
    data = [AuditEventPublic.model_validate(r, from_attributes=True) for r in rows]
    return AuditEventsPublic(data=data, count=count)

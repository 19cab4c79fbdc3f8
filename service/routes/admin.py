"""Tenants, API keys and the audit log (`admin`: its own tenant; `operator`: every tenant),
and `GET /v1/me` for any key. Who may do what is decided in `core/admin.py`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from core import admin
from core.db import as_utc
from core.models import ApiKey, AuditEvent, Tenant
from core.settings import Settings
from core.tenancy import limits_for, usage
from service.deps import (
    AdminDep,
    Offset,
    OperatorDep,
    PathId,
    QueryId,
    ReadDep,
    SessionDep,
    SettingsDep,
    client_of,
    page,
)
from service.errors import ERROR_RESPONSES
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


@me_router.get("/me", response_model=MePublic)
def read_me(principal: ReadDep, session: SessionDep, settings: SettingsDep) -> MePublic:
    """Who this key is: its tenant, scopes, the limits in force and what is used of them."""
    tenant = admin.get_tenant(session, principal.tenant_id)
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
    principal: OperatorDep,
    session: SessionDep,
    settings: SettingsDep,
) -> TenantPublic:
    limits = body.model_dump(exclude={"name"}, exclude_none=True)
    tenant = admin.create_tenant(session, principal, body.name, limits, client_of(request))
    return tenant_public(session, tenant, settings)


@router.get("/tenants", response_model=TenantsPublic)
def list_tenants(
    principal: AdminDep,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> TenantsPublic:
    """Every tenant for an operator; a tenant admin's own."""
    where = admin.visible_tenants(principal)
    rows, count = page(session, Tenant, where, (Tenant.name,), limit, offset)
    return TenantsPublic(data=[tenant_public(session, t, settings) for t in rows], count=count)


@router.patch("/tenants/{tenant}", response_model=TenantPublic)
def update_tenant_limits(
    request: Request,
    tenant: PathId,
    body: TenantLimitsUpdate,
    principal: OperatorDep,
    session: SessionDep,
    settings: SettingsDep,
) -> TenantPublic:
    """Set a tenant's limits; a field sent as null goes back to the service's default."""
    changes = body.model_dump(exclude_unset=True)
    row = admin.update_limits(session, principal, tenant, changes, client_of(request))
    return tenant_public(session, row, settings)


@router.delete("/tenants/{tenant}", response_model=TenantPublic)
def disable_tenant_route(
    request: Request,
    tenant: PathId,
    principal: OperatorDep,
    session: SessionDep,
    settings: SettingsDep,
) -> TenantPublic:
    """Disable a tenant: all its keys are revoked (401 from now on) and it gets no new
    ones. Its datasets, jobs and models are kept; jobs already queued still run."""
    row = admin.disable_tenant(session, principal, tenant, client_of(request))
    return tenant_public(session, row, settings)


@router.post("/keys", status_code=201, response_model=KeyCreated)
def create_key_route(
    request: Request, body: KeyCreate, principal: AdminDep, session: SessionDep
) -> KeyCreated:
    """A new API key for a tenant (a tenant admin: its own, with scopes it holds itself).
    The token is in this response only."""
    key, token = admin.create_key(
        session, principal, body.tenant, list(body.scopes), body.name, client_of(request)
    )
    return KeyCreated(**key_public(key).model_dump(), key=token)


@router.get("/keys", response_model=KeysPublic)
def list_keys(
    principal: AdminDep,
    session: SessionDep,
    tenant: QueryId = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> KeysPublic:
    """Keys of `tenant`; without it, every key for an operator, its own for a tenant admin."""
    where = admin.visible_keys(session, principal, tenant)
    order = (ApiKey.created_at.desc(), ApiKey.id)
    rows, count = page(session, ApiKey, where, order, limit, offset)
    return KeysPublic(data=[key_public(k) for k in rows], count=count)


@router.delete("/keys/{key_id}", status_code=204, response_class=Response)
def revoke_key_route(
    request: Request, key_id: PathId, principal: AdminDep, session: SessionDep
) -> Response:
    """Revoke a key: from now on it gets 401. Revoking twice is harmless."""
    admin.revoke_key(session, principal, key_id, client_of(request))
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
    model downloads; each with the key that did it and the client address. An operator
    reads every tenant's (or `tenant`'s); a tenant admin its own."""
    where = admin.visible_audit(session, principal, tenant, action)
    rows, count = page(session, AuditEvent, where, (AuditEvent.id.desc(),), limit, offset)
    data = [AuditEventPublic.model_validate(r, from_attributes=True) for r in rows]
    return AuditEventsPublic(data=data, count=count)

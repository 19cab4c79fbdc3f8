"""Administering tenants, API keys and the audit log, and who may do which part of it.

- `admin` is bounded to its own tenant: its keys (made only with scopes the caller holds
  itself, revoked only when the caller holds every scope of the key), its audit log and its
  own tenant's view. Naming another tenant is refused without saying whether it exists.
- `operator`, held only by keys of the default tenant, administers every tenant: creates
  them, sets their limits, disables them, makes and revokes any tenant's keys, and reads
  the whole audit log.

Each change is checked, made, audited and committed here in one call; the routes parse,
call one function and answer. The list functions return the conditions of what the caller
may see, for the routes' paging.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from core import tenancy
from core.errors import ErrorCode, ServiceError
from core.models import ApiKey, AuditEvent, Tenant
from core.tenancy import Principal, TenancyError, audit


def is_operator(principal: Principal) -> bool:
    return principal.has("operator")


def _need_operator(principal: Principal, what: str) -> None:
    if not is_operator(principal):
        raise ServiceError(
            ErrorCode.INSUFFICIENT_SCOPE,
            f"{what} needs the 'operator' scope (keys of the default tenant); this API key "
            f"has: {', '.join(sorted(principal.scopes))}",
        )


def get_tenant(session: Session, ref: str) -> Tenant:
    """The tenant with id or name `ref`, or TENANT_NOT_FOUND."""
    tenant = tenancy.get_tenant(session, ref)
    if tenant is None:
        raise ServiceError(ErrorCode.TENANT_NOT_FOUND, f"tenant {ref!r} not found")
    return tenant


def acted_on(session: Session, principal: Principal, ref: str | None) -> Tenant:
    """The tenant `ref` (the caller's own when None) if the caller may administer it."""
    own = get_tenant(session, principal.tenant_id)
    if ref is None or ref in (own.id, own.name):
        return own
    _need_operator(principal, "administering another tenant")
    return get_tenant(session, ref)


def _audit_tenant(
    session: Session,
    principal: Principal,
    action: str,
    tenant: Tenant,
    client: str | None,
    detail: dict[str, Any],
) -> None:
    # Recorded under the tenant acted on, not the operator's own.
    audit(session, principal, f"tenant.{action}", "tenant", tenant.id, client, detail, tenant.id)


def create_tenant(
    session: Session, principal: Principal, name: str, limits: dict[str, Any], client: str | None
) -> Tenant:
    _need_operator(principal, "creating tenants")
    try:
        tenant = tenancy.create_tenant(session, name, **limits)
    except TenancyError as exc:
        raise ServiceError(ErrorCode.TENANT_EXISTS, str(exc)) from exc
    _audit_tenant(session, principal, "create", tenant, client, limits)
    session.commit()
    return tenant


def update_limits(
    session: Session, principal: Principal, ref: str, changes: dict[str, Any], client: str | None
) -> Tenant:
    """Set a tenant's limits; a field given as None goes back to the service's default."""
    _need_operator(principal, "changing a tenant's limits")
    tenant = get_tenant(session, ref)
    try:
        tenancy.set_limits(tenant, **changes)
    except TenancyError as exc:
        raise ServiceError(ErrorCode.VALIDATION_ERROR, str(exc)) from exc
    _audit_tenant(session, principal, "update", tenant, client, changes)
    session.commit()
    return tenant


def disable_tenant(session: Session, principal: Principal, ref: str, client: str | None) -> Tenant:
    """Revoke every key of the tenant and refuse it new ones; its objects are kept."""
    _need_operator(principal, "disabling a tenant")
    tenant = get_tenant(session, ref)
    try:
        revoked = tenancy.disable_tenant(session, tenant)
    except TenancyError as exc:
        raise ServiceError(ErrorCode.TENANT_PROTECTED, str(exc)) from exc
    _audit_tenant(session, principal, "disable", tenant, client, {"keys_revoked": revoked})
    session.commit()
    return tenant


def _need_scopes(principal: Principal, scopes: list[str], what: str) -> None:
    """A tenant admin hands out, or takes away, only what it holds itself."""
    missing = sorted(set(scopes) - principal.scopes)
    if missing and not is_operator(principal):
        raise ServiceError(
            ErrorCode.INSUFFICIENT_SCOPE,
            f"{what} with scope(s) {', '.join(missing)} that this API key does not hold "
            f"(it has: {', '.join(sorted(principal.scopes))})",
        )


def create_key(
    session: Session,
    principal: Principal,
    tenant_ref: str,
    scopes: list[str],
    name: str,
    client: str | None,
) -> tuple[ApiKey, str]:
    """A new key for the tenant; returns (row, token), the token shown this once."""
    tenant = acted_on(session, principal, tenant_ref)
    _need_scopes(principal, scopes, "cannot create a key")
    try:
        key, token = tenancy.create_key(session, tenant, scopes, name)
    except TenancyError as exc:
        code = ErrorCode.TENANT_DISABLED if tenant.disabled_at else ErrorCode.VALIDATION_ERROR
        raise ServiceError(code, str(exc)) from exc
    detail = {"scopes": key.scopes, "for_tenant": tenant.id}
    audit(session, principal, "key.create", "key", key.id, client, detail, tenant.id)
    session.commit()
    return key, token


def revoke_key(session: Session, principal: Principal, key_id: str, client: str | None) -> None:
    """Revoke a key: 401 from now on. Another tenant's key (for a tenant admin) is absent."""
    key = session.get(ApiKey, key_id)
    if key is None or (key.tenant_id != principal.tenant_id and not is_operator(principal)):
        raise ServiceError(ErrorCode.KEY_NOT_FOUND, f"API key {key_id!r} not found")
    _need_scopes(principal, list(key.scopes), "cannot revoke a key")
    tenancy.revoke_key(session, key_id)
    audit(session, principal, "key.revoke", "key", key.id, client, tenant_id=key.tenant_id)
    session.commit()


def visible_tenants(principal: Principal) -> list[Any]:
    """An operator sees every tenant, a tenant admin its own."""
    return [] if is_operator(principal) else [Tenant.id == principal.tenant_id]


def visible_keys(session: Session, principal: Principal, tenant_ref: str | None) -> list[Any]:
    """The keys of `tenant_ref`; when None, all of them for an operator, else its own."""
    if tenant_ref is None and is_operator(principal):
        return []
    return [ApiKey.tenant_id == acted_on(session, principal, tenant_ref).id]


def visible_audit(
    session: Session, principal: Principal, tenant_ref: str | None, action: str | None
) -> list[Any]:
    """Audit events of `tenant_ref` (as `visible_keys`), of one `action` when given."""
    where: list[Any] = [] if action is None else [AuditEvent.action == action]
    if tenant_ref is None and is_operator(principal):
        return where
    return [*where, AuditEvent.tenant_id == acted_on(session, principal, tenant_ref).id]

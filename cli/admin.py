"""`finetune tenants` and `keys`, and the admin key printed on the first start."""

from __future__ import annotations

import argparse
import logging

from core.settings import Settings, get_settings

log = logging.getLogger("finetune")


def announce_auth(settings: Settings) -> None:
    """First start with auth on: create and print an admin key (once). Auth off: say so."""
    if not settings.auth_enabled:
        log.warning(
            "AUTH_ENABLED=false: no API keys are checked; every request acts as tenant "
            "'default' with every scope. Run it like this only behind your own gate."
        )
        return
    from core.db import session_scope
    from core.tenancy import ensure_bootstrap_key

    with session_scope(settings) as session:
        token = ensure_bootstrap_key(session)
    if token:
        print(
            "\n" + "=" * 78 + "\n"
            "No admin API key existed, so one was created. It is shown this once:\n\n"
            f"    {token}\n\n"
            "Send it as `Authorization: Bearer <key>`. Make per-tenant keys with\n"
            "`finetune keys create --tenant NAME` or POST /v1/admin/keys.\n" + "=" * 78 + "\n",
            flush=True,
        )


def cmd_tenants(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from sqlalchemy import select

    from core.db import migrate, session_scope
    from core.models import Tenant
    from core.tenancy import (
        LIMIT_FIELDS,
        TenancyError,
        audit,
        create_tenant,
        disable_tenant,
        get_tenant,
        limits_for,
        set_limits,
        usage,
    )

    if args.action in ("create", "set", "disable") and not args.name:
        print(f"`finetune tenants {args.action}` needs a tenant name")
        return 2
    settings = get_settings()
    migrate(settings)
    limits = {f: getattr(args, f) for f in LIMIT_FIELDS if getattr(args, f, None) is not None}
    with session_scope(settings) as session:
        try:
            if args.action == "create":
                tenant = create_tenant(session, args.name, **limits)
                audit(session, None, "tenant.create", "tenant", tenant.id, "cli", limits, tenant.id)
                session.commit()
                print(f"created tenant {tenant.name} ({tenant.id})")
            elif args.action in ("disable", "set"):
                found = get_tenant(session, args.name)
                if found is None:
                    print(f"no tenant {args.name!r}")
                    return 2
                if args.action == "disable":
                    detail: dict[str, object] = {"keys_revoked": disable_tenant(session, found)}
                else:
                    set_limits(found, **limits)
                    detail = dict(limits)
                action = f"tenant.{'disable' if args.action == 'disable' else 'update'}"
                audit(session, None, action, "tenant", found.id, "cli", detail, found.id)
                session.commit()
                print(f"{args.action}: tenant {found.name} {detail}")
            else:
                for t in session.scalars(select(Tenant).order_by(Tenant.name)):
                    print(
                        f"{t.id:22s} {t.name:20s} {asdict(limits_for(t, settings))} "
                        f"{usage(session, t.id)}"
                    )
        except TenancyError as exc:
            print(exc)
            return 2
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from core.db import migrate, session_scope
    from core.models import ApiKey
    from core.tenancy import TenancyError, audit, create_key, get_tenant, revoke_key

    if args.action == "create" and not args.tenant:
        print("`finetune keys create` needs --tenant NAME (`finetune tenants list`)")
        return 2
    if args.action == "revoke" and not args.key_id:
        print("`finetune keys revoke` needs the key id (`finetune keys list`)")
        return 2
    settings = get_settings()
    migrate(settings)
    with session_scope(settings) as session:
        if args.action == "create":
            assert args.tenant is not None
            tenant = get_tenant(session, args.tenant)
            if tenant is None:
                print(f"no tenant {args.tenant!r}; create it with `finetune tenants create`")
                return 2
            try:
                key, token = create_key(session, tenant, args.scopes.split(","), args.name)
            except TenancyError as exc:
                print(exc)
                return 2
            audit(
                session,
                None,
                "key.create",
                "key",
                key.id,
                "cli",
                {"scopes": key.scopes},
                tenant_id=tenant.id,
            )
            session.commit()
            print(f"created key {key.id} for tenant {tenant.name} with scopes {key.scopes}")
            print(f"API key (shown once, stored only hashed): {token}")
        elif args.action == "revoke":
            revoked = revoke_key(session, args.key_id)
            if revoked is None:
                print(f"no API key {args.key_id!r}")
                return 2
            audit(
                session, None, "key.revoke", "key", revoked.id, "cli", tenant_id=revoked.tenant_id
            )
            session.commit()
            print(f"revoked key {revoked.id}")
        else:
            query = select(ApiKey).order_by(ApiKey.created_at)
            if args.tenant:
                tenant = get_tenant(session, args.tenant)
                query = query.where(ApiKey.tenant_id == (tenant.id if tenant else args.tenant))
            for k in session.scalars(query):
                state = "revoked" if k.revoked_at else "active"
                print(f"{k.id}  {k.tenant_id:22s} {','.join(k.scopes):18s} {state:8s} {k.name}")
    return 0

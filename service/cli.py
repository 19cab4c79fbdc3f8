"""`finetune`: run the service, a worker, migrations, or the end-to-end demo."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

from core.settings import Settings, get_settings

log = logging.getLogger("finetune")


def worker_command(settings: Settings, pool: str = "solo") -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        f"--pool={pool}",
        "--concurrency=1",
        "-Q",
        settings.task_queue,
        "--loglevel",
        settings.log_level,
        "--hostname",
        f"finetune-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
    ]


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class WorkerSupervisor(threading.Thread):
    """Keeps the embedded worker child alive: restarts it if it dies, with backoff."""

    def __init__(self, command: list[str], max_restarts: int = 20):
        super().__init__(name="worker-supervisor", daemon=True)
        self.command = command
        self.max_restarts = max_restarts
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        restarts = 0
        while not self.stopping.is_set():
            self.proc = subprocess.Popen(self.command)
            log.info("worker child process started (pid %d)", self.proc.pid)
            code = self.proc.wait()
            if self.stopping.is_set():
                return
            restarts += 1
            if restarts > self.max_restarts:
                log.error("worker exited %d times; giving up (last code %d)", restarts, code)
                return
            delay = min(30.0, 2.0**restarts)
            log.error("worker exited with code %d; restarting in %.0fs", code, delay)
            self.stopping.wait(delay)

    def stop(self) -> None:
        self.stopping.set()
        if self.proc is not None:
            stop_process(self.proc)


def cmd_migrate(_: argparse.Namespace) -> int:
    from core.db import migrate

    migrate()
    print("database schema is up to date")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    os.execv(sys.executable, worker_command(settings, args.pool))
    return 0  # not reached


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


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from core.db import migrate

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings)
    announce_auth(settings)
    supervisor = None if args.no_worker else WorkerSupervisor(worker_command(settings))
    if supervisor is not None:
        supervisor.start()
    try:
        uvicorn.run("service.main:app", host=args.host, port=args.port, log_level="info")
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from core.backbones import BACKBONES, locate_weights

    settings = get_settings()
    names = sorted(BACKBONES) if args.all or args.action == "list" else args.names
    unknown = [n for n in names if n not in BACKBONES]
    if unknown:
        print(f"unknown backbone(s) {unknown}; available: {', '.join(sorted(BACKBONES))}")
        return 2
    if args.action == "list":
        for name in names:
            where = locate_weights(
                BACKBONES[name],
                settings.weights_dir,
                settings.resolved_torch_hub_dir,
                settings.resolved_hf_cache,
            )
            print(f"{name:24s} {f'{where.kind}: {where.path}' if where else 'not on this host'}")
        return 0
    if not names:
        print("name at least one backbone, or --all")
        return 2
    from core.settings import weights_paths
    from worker.training.weights import pull

    failed = 0
    for name in names:
        try:
            print(f"{name}: {pull(BACKBONES[name], *weights_paths(settings))}")
        except Exception as exc:  # noqa: BLE001 - report each backbone, go on with the rest
            failed += 1
            print(f"{name}: FAILED: {exc}")
    return 1 if failed else 0


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


def cmd_demo(args: argparse.Namespace) -> int:
    from service.demo import run_demo

    return run_demo(
        host=args.host,
        port=args.port,
        epochs=args.epochs,
        image_size=args.image_size,
        backbone=args.backbone,
        keep_running=not args.exit,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="migrate, start a worker child process and the HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a Celery training worker in the foreground")
    p.add_argument("--pool", default="solo", choices=["solo", "prefork", "threads"])
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("migrate", help="alembic upgrade head")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "weights", help="list where ImageNet weights are, or pull them for air-gapped use"
    )
    p.add_argument("action", choices=["list", "pull"])
    p.add_argument("names", nargs="*", help="backbone names (see GET /v1/backbones)")
    p.add_argument("--all", action="store_true", help="every registered backbone")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("tenants", help="create, list, disable or set the limits of tenants")
    p.add_argument("action", choices=["create", "list", "set", "disable"])
    p.add_argument("name", nargs="?", help="tenant name (create, set)")
    p.add_argument("--max-running-jobs", dest="max_running_jobs", type=int)
    p.add_argument("--max-queued-jobs", dest="max_queued_jobs", type=int)
    p.add_argument("--max-storage-bytes", dest="max_storage_bytes", type=int)
    p.add_argument("--max-job-duration-seconds", dest="max_job_duration_seconds", type=float)
    p.add_argument("--rate-limit-per-minute", dest="rate_limit_per_minute", type=int)
    p.set_defaults(func=cmd_tenants)

    p = sub.add_parser("keys", help="create, list or revoke API keys")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("key_id", nargs="?", help="the key to revoke")
    p.add_argument("--tenant", help="tenant name or id (create; filter for list)")
    p.add_argument("--scopes", default="read,write", help="comma-separated: read,write,admin")
    p.add_argument("--name", default="", help="a label for the key")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser(
        "demo", help="start the service, fine-tune on scikit-learn digits, report accuracy"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--exit", action="store_true", help="stop the service when the demo is done")
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

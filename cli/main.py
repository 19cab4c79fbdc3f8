"""`finetune`: run the service, a worker, migrations, or the end-to-end demo."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cli.admin import cmd_keys, cmd_tenants
from cli.processes import QUEUE_ROLES, cmd_migrate, cmd_serve, cmd_worker
from cli.weights import cmd_weights


def cmd_demo(args: argparse.Namespace) -> int:
    # Imported here: the demo needs the `demo` extra (httpx, tqdm, scikit-learn), which an
    # API-only install does not have.
    from cli.demo import run_demo

    return run_demo(
        host=args.host,
        port=args.port,
        epochs=args.epochs,
        image_size=args.image_size,
        backbone=args.backbone,
        keep_running=not args.exit,
    )


def api_workers(value: str) -> int:
    n = int(value) if value.isdigit() else 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"--workers must be 1 to 64 API processes; got {value!r}")
    return n


def port_number(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1-65535)")
    return port


USER_COMMANDS = ("login", "logout", "whoami", "datasets", "jobs", "predict", "models")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head = argv[0].split("=")[0] if argv else ""
    if head in USER_COMMANDS or head in ("--url", "--api-key"):
        # The user's side (typer, rich, the client): `cli/user/`. Imported only here, so the
        # operator commands never load it.
        from cli.user import run

        return run(argv)
    parser = argparse.ArgumentParser(
        prog="finetune",
        description=__doc__,
        epilog="For users of a running service: finetune login | datasets | jobs | predict | "
        "models | whoami (each with --help).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="migrate, start worker child processes and the HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    p.add_argument(
        "--workers",
        type=api_workers,
        default=1,
        help="API processes on the port (uvicorn workers; give each core one). The rate "
        "limit is shared between them only on Redis (RATE_LIMIT_STORAGE_URL or BROKER_URL)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a Celery worker in the foreground")
    p.add_argument("--pool", default="solo", choices=["solo", "prefork", "threads"])
    p.add_argument(
        "--queues",
        default="all",
        choices=QUEUE_ROLES,
        help="training: TASK_QUEUE; light: LIGHT_QUEUE (previews); all: both (default)",
    )
    p.add_argument(
        "--gpus",
        default=None,
        metavar="all|0,1",
        help="one worker per GPU (pinned with CUDA_VISIBLE_DEVICES) on GPU_QUEUE; "
        "--queues is then ignored",
    )
    p.add_argument(
        "--per-job",
        action="store_true",
        help="with --gpus: one worker that sees all those GPUs and trains one job on them "
        "at once (jobs with `gpus` 2..N), instead of one worker per GPU",
    )
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
    p.add_argument("--port", type=port_number, default=8000)
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

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

from service.settings import Settings, get_settings

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
    from service.db import migrate

    migrate()
    print("database schema is up to date")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    os.execv(sys.executable, worker_command(settings, args.pool))
    return 0  # not reached


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.db import migrate

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings)
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
    from service.backbones import BACKBONES, locate_weights

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
    from worker.training.weights import pull

    failed = 0
    for name in names:
        try:
            print(f"{name}: {pull(BACKBONES[name], settings)}")
        except Exception as exc:  # noqa: BLE001 - report each backbone, go on with the rest
            failed += 1
            print(f"{name}: FAILED: {exc}")
    return 1 if failed else 0


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

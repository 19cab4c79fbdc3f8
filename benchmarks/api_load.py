"""Requests/s of the API's hot routes under wrk, on SQLite and on PostgreSQL (issue 15).

For each database: a fresh one (SQLite under a temporary folder; a temporary PostgreSQL
database on 127.0.0.1:5432), 10,000 jobs seeded for one tenant (half `failed`, so that the
deep page below is a full page, which is checked; then ANALYZE, and VACUUM on PostgreSQL, as
autovacuum keeps a live database), one
`finetune serve --no-worker` process, then `wrk -t1 -c8` for N seconds on each route:

    GET /healthz, GET /v1/jobs/{id}, GET /v1/jobs?limit=20,
    GET /v1/jobs?status=failed&limit=20&offset=3000 (a deep page; offset 10 with --smoke)

and the table with each route's ratio to /healthz. Then a mixed load (8 connections for
--mixed seconds: 8 polls and 1 list to each submit) that counts failed requests (non-2xx
and socket errors). Submits go to a queue no worker reads (Redis on PostgreSQL; the
embedded broker on SQLite). wrk is Debian's package (`apt-get install wrk`).

    .venv/bin/python benchmarks/api_load.py [--jobs 10000] [--seconds 10] [--mixed 60]
    .venv/bin/python benchmarks/api_load.py --smoke     # 200 jobs, 1 s a route, 2 s mixed
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.db import PoolSize, get_engine, migrate, session_scope, utcnow  # noqa: E402
from core.models import DEFAULT_TENANT, Dataset, Job, Tenant  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.tenancy import create_key  # noqa: E402

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

MIXED_LUA = """
local n = 0
local hdr = {["Authorization"] = "Bearer %(token)s", ["Content-Type"] = "application/json"}
request = function()
  n = n + 1
  local k = n %% 10
  if k == 0 then
    return wrk.format("POST", "/v1/jobs", hdr, '{"dataset_id": "ds_bench", "epochs": 1}')
  elseif k == 5 then
    return wrk.format("GET", "/v1/jobs?limit=20", hdr)
  end
  return wrk.format("GET", "/v1/jobs/%(job)s", hdr)
end
"""


def seed(settings: Settings, jobs: int) -> tuple[str, str]:
    """`jobs` jobs of the default tenant, half failed; returns (a job id, a token)."""
    migrate(settings)
    now = utcnow()
    with session_scope(settings) as s:
        s.add(
            Dataset(
                id="ds_bench",
                tenant_id=DEFAULT_TENANT,
                name="bench",
                archive_key="datasets/ds_bench/images.zip",
                index_key="datasets/ds_bench/index.json",
                size_bytes=1,
                sha256="0" * 64,
                num_images=20,
                classes=["a", "b"],
                class_counts={"a": 10, "b": 10},
                report={},
            )
        )
        s.flush()
        statuses = ("succeeded", "failed", "canceled", "failed")
        s.bulk_insert_mappings(
            Job,  # type: ignore[arg-type]
            [
                {
                    "id": f"job_{i:08d}",
                    "tenant_id": DEFAULT_TENANT,
                    "dataset_id": "ds_bench",
                    "status": statuses[i % 4],
                    "config": {"epochs": 1, "backbone": "mobilenetv3_small_100"},
                    "created_at": now - timedelta(seconds=jobs - i),
                    "epoch": 1,
                    "total_epochs": 1,
                }
                for i in range(jobs)
            ],
        )
        _, token = create_key(s, s.get(Tenant, DEFAULT_TENANT), ["read", "write"], "bench")
    # Statistics and PostgreSQL's visibility map as autovacuum keeps them on a live database
    # (a just-loaded table has neither: every index-only scan would visit the heap).
    engine = get_engine(settings.resolved_database_url, PoolSize.of(settings))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE jobs" if engine.name == "postgresql" else "ANALYZE")
    return f"job_{jobs // 2:08d}", token


def wrk(url: str, seconds: int, token: str, script: Path | None = None) -> dict[str, float]:
    cmd = ["wrk", "-t1", "-c8", f"-d{seconds}s", "--timeout", "10s"]
    cmd += ["-H", f"Authorization: Bearer {token}"] if script is None else ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = int(non2xx.group(1)) if non2xx else 0
    failed += sum(int(g) for g in errors.groups()) if errors else 0
    return {"rps": rps, "total": total, "failed": failed}


def serve(env: dict[str, str], port: int, log: Path, workers: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "cli", "serve", "--no-worker", "--port", str(port)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the API did not start:\n" + log.read_text()[-3000:])


def run_backend(name: str, env: dict[str, str], tmp: Path, args: argparse.Namespace) -> dict:
    settings = Settings(**{k.lower(): v for k, v in env.items()})  # type: ignore[arg-type]
    job_id, token = seed(settings, args.jobs)
    port = 18000 + secrets.randbelow(2000)
    proc = serve(env, port, tmp / f"api-{name}.log", args.workers)
    base = f"http://127.0.0.1:{port}"
    deep = 3000 if args.jobs >= 10_000 else args.jobs // 20
    routes = {
        "GET /healthz": "/healthz",
        "GET /v1/jobs/{id}": f"/v1/jobs/{job_id}",
        "GET /v1/jobs?limit=20": "/v1/jobs?limit=20",
        f"GET /v1/jobs?status=failed&limit=20&offset={deep}": (
            f"/v1/jobs?status=failed&limit=20&offset={deep}"
        ),
    }
    try:
        for label, path in list(routes.items())[2:]:  # full pages, not an empty one past the end
            request = urllib.request.Request(
                base + path, headers={"Authorization": f"Bearer {token}"}
            )
            with urllib.request.urlopen(request, timeout=30) as answer:
                assert len(json.load(answer)["data"]) == 20, f"{label}: not a full page"
        results = {label: wrk(base + path, args.seconds, token) for label, path in routes.items()}
        script = tmp / f"mixed-{name}.lua"
        script.write_text(MIXED_LUA % {"token": token, "job": job_id})
        results["mixed"] = wrk(base, args.mixed, token, script)
    finally:
        proc.terminate()
        proc.wait(30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=10, help="wrk's duration per route")
    parser.add_argument("--mixed", type=int, default=60, help="the mixed load's duration")
    parser.add_argument("--workers", type=int, default=1, help="`finetune serve --workers`")
    parser.add_argument("--only", choices=("sqlite", "postgresql"))
    parser.add_argument("--smoke", action="store_true", help="200 jobs, short runs")
    args = parser.parse_args()
    if args.smoke:
        args.jobs, args.seconds, args.mixed = 200, 1, 2
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk (see the Makefile's install step)")
    import psycopg
    import redis

    common = {
        "AUTH_ENABLED": "true",
        "RATE_LIMIT_PER_MINUTE": "1000000",
        "TENANT_MAX_QUEUED_JOBS": "1000000",
        "ALLOW_WEIGHT_DOWNLOADS": "true",
        "LOG_LEVEL": "WARNING",
    }
    table: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.only in (None, "sqlite"):
            env = {**common, "DATA_DIR": str(tmp / "sqlite"), "DATABASE_URL": "", "BROKER_URL": ""}
            table["SQLite"] = run_backend("sqlite", env, tmp, args)
        if args.only in (None, "postgresql"):
            db = f"finetune_bench_{secrets.token_hex(4)}"
            queue = f"bench-{secrets.token_hex(4)}"
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{db}"')
            base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
            env = {
                **common,
                "DATA_DIR": str(tmp / "pg"),
                "DATABASE_URL": f"{base}/{db}",
                "BROKER_URL": REDIS_URL,
                "TASK_QUEUE": queue,
                "LIGHT_QUEUE": f"{queue}-light",
            }
            try:
                table["PostgreSQL"] = run_backend("pg", env, tmp, args)
            finally:
                redis.Redis.from_url(REDIS_URL).delete(queue, f"{queue}-light")
                with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    print(f"{args.jobs} jobs, wrk -t1 -c8, {args.seconds} s a route, workers={args.workers}")
    print(f"{'route':<50}" + "".join(f"{b:>22}" for b in table))
    for label in next(iter(table.values())):
        if label == "mixed":
            continue
        cells = []
        for res in table.values():
            r, h = res[label]["rps"], res["GET /healthz"]["rps"]
            cells.append(f"{r:>10.0f} req/s {r / h:>5.2f}x")
        print(f"{label:<50}" + "".join(f"{c:>22}" for c in cells))
    for backend, res in table.items():
        m = res["mixed"]
        print(
            f"mixed {args.mixed} s ({backend}): {m['total']} requests, {m['rps']:.0f} req/s, "
            f"{m['failed']} failed"
        )
    print(json.dumps({b: r for b, r in table.items()}))
    failed = {b: r["mixed"]["failed"] for b, r in table.items() if r["mixed"]["failed"]}
    if failed:
        sys.exit(f"failed requests under the mixed load: {failed} (see the API logs)")


if __name__ == "__main__":
    main()

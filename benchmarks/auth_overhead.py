"""What authentication, ownership checks and the rate limiter cost per request.

Runs the API in-process on the embedded default (SQLite under a temporary folder) and
times `GET /v1/jobs/{id}` and `GET /v1/datasets`, alternating auth off (AUTH_ENABLED=false)
and auth on (a bearer key: hash, key lookup, tenant limits, token bucket) round by round,
so that the machine's noise hits both sides alike. Prints the medians and their ratio.

    .venv/bin/python benchmarks/auth_overhead.py [--requests 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi.testclient import TestClient  # noqa: E402

from core.db import migrate, session_scope  # noqa: E402
from core.models import DEFAULT_TENANT, Dataset, Job, Tenant  # noqa: E402
from core.settings import Settings, get_settings  # noqa: E402
from core.tenancy import create_key  # noqa: E402
from service.main import create_app  # noqa: E402


def client_for(settings: Settings) -> TestClient:
    app = create_app(settings)
    app.dependency_overrides[get_settings] = lambda: settings
    return TestClient(app)


def timed(client: TestClient, paths: list[str], n: int, headers: dict[str, str]) -> float:
    """Median seconds per request over n requests cycling through `paths`."""
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        resp = client.get(paths[i % len(paths)], headers=headers)
        samples.append(time.perf_counter() - t0)
        assert resp.status_code == 200, resp.text
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a few requests: does it run")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.rounds = 10, 1
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(
            data_dir=Path(tmp), database_url="", broker_url="", rate_limit_per_minute=10**9
        )
        off = Settings(auth_enabled=False, **common)
        on = Settings(auth_enabled=True, **common)
        migrate(on)
        with session_scope(on) as s:
            ds = Dataset(
                id="ds_bench",
                tenant_id=DEFAULT_TENANT,
                name="bench",
                archive_key="datasets/ds_bench/images.zip",
                index_key="datasets/ds_bench/index.json",
                size_bytes=1,
                sha256="0" * 64,
                num_images=2,
                classes=["a", "b"],
                class_counts={"a": 1, "b": 1},
                report={},
            )
            s.add(ds)
            s.add(Job(id="job_bench", dataset_id=ds.id, status="queued", config={"epochs": 1}))
            _, token = create_key(s, s.get(Tenant, DEFAULT_TENANT), ["read"], "bench")
            s.commit()
        paths = ["/v1/jobs/job_bench", "/v1/datasets"]
        medians: dict[str, list[float]] = {"off": [], "on": []}
        with client_for(off) as c_off, client_for(on) as c_on:
            for _ in range(args.rounds):
                medians["off"].append(timed(c_off, paths, args.requests, {}))
                medians["on"].append(
                    timed(c_on, paths, args.requests, {"Authorization": f"Bearer {token}"})
                )
    off_ms = statistics.median(medians["off"]) * 1000
    on_ms = statistics.median(medians["on"]) * 1000
    print(f"auth off: median {off_ms:.2f} ms/request")
    print(f"auth on:  median {on_ms:.2f} ms/request")
    print(f"ratio on/off: {on_ms / off_ms:.2f} (+{on_ms - off_ms:.2f} ms)")


if __name__ == "__main__":
    main()

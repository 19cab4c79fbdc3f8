"""A time budget as the user reads it (issue 12): `{"time_budget_seconds": B}` jobs through
the real embedded service (`finetune serve`: API, SQLite, local store, its worker), and
where each job's seconds went.

For each proxy (built by `proxies.py`, uploaded as `train/` + `test/` folders) and budget,
one job is submitted and polled every 0.2 s. Printed per job: its wall (the job row's
`finished_at - started_at`, what the budget bounds), the share of the budget used, the time
spent in each phase the worker reports (planning, preparing, extracting features, probing,
training, finding label issues, exporting; from the polls, so to within 0.2 s), what the
recipe planned (epochs, its estimate of the fixed phases) and what ran, and the test
split's accuracy from the job's report. A job that overruns its budget by more than 10% is
a failure (exit status 1).

    .venv/bin/python benchmarks/budget_wall.py [--proxies digits digits-degraded]
        [--budgets 30 60 120] [--seed 0]
    .venv/bin/python benchmarks/budget_wall.py --smoke     # 100 digits, one 20-s job
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxies  # noqa: E402
from start_latency import SERVER_VARS, serve, ts  # noqa: E402

OVERRUN = 1.10  # a job past this share of its budget fails the benchmark


def run_job(client: httpx.Client, dataset_id: str, budget: float) -> dict[str, Any]:
    """Submit one budgeted job, poll it to the end; the job, its report and phase times."""
    resp = client.post("/v1/jobs", json={"dataset_id": dataset_id, "time_budget_seconds": budget})
    if resp.status_code != 201:
        raise RuntimeError(f"submit refused: {resp.status_code} {resp.text}")
    job_id = resp.json()["id"]
    phases: dict[str, float] = {}
    last, last_t = None, time.monotonic()
    deadline = time.monotonic() + budget * 3 + 120
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        now = time.monotonic()
        if last is not None:
            phases[last] = phases.get(last, 0.0) + now - last_t
        last, last_t = (job.get("progress") or {}).get("phase"), now
        if job["status"] in ("succeeded", "failed", "canceled"):
            break
        if now > deadline:
            raise RuntimeError(f"job {job_id} still {job['status']} after {budget * 3 + 120} s")
        time.sleep(0.2)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
    report = client.get(f"/v1/jobs/{job_id}/report").json()
    epochs = client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    return {"job": job, "report": report, "phases": phases, "epochs": epochs}


def summarise(name: str, budget: float, out: dict[str, Any]) -> dict[str, Any]:
    job, report = out["job"], out["report"]
    wall = (ts(job["finished_at"]) - ts(job["started_at"])).total_seconds()
    config = job["config"]
    plan = config.get("plan") or {}
    speed = plan.get("speed") or {}
    tuned = [m for m in out["epochs"] if m.get("phase") == "fine_tune"]
    test = (report.get("test") or {}).get("top1_accuracy")
    return {
        "proxy": name,
        "budget": budget,
        "wall": round(wall, 1),
        "used": round(wall / budget, 3),
        "phases": {k: round(v, 1) for k, v in out["phases"].items() if k},
        "size": config.get("image_size"),
        "strategy": config.get("strategy"),
        "planned_epochs": config.get("epochs"),
        "epochs_run": len(tuned),
        "fitted_epochs": report["training"].get("epochs_fitted_to_budget"),
        "best_epoch": (report.get("best_epoch") or {}).get("epoch"),
        "estimated_delivery_seconds": speed.get("estimated_delivery_seconds"),
        "planning_seconds": speed.get("planning_seconds"),
        "estimated_fixed_seconds": speed.get("estimated_fixed_seconds"),
        "estimated_epoch_seconds": speed.get("estimated_epoch_seconds"),
        "test_accuracy": test,
        "speed": speed,
        "candidates": plan.get("candidates"),
        "not_measured": plan.get("not_measured"),
        "epochs": [
            {k: m.get(k) for k in ("epoch", "val_accuracy", "epoch_seconds")} for m in tuned
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxies", nargs="+", default=["digits", "digits-degraded"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[30, 60, 120])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=None)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--log", type=Path, help="keep the service's log here")
    parser.add_argument("--smoke", action="store_true", help="100 digits, one 20-s job")
    args = parser.parse_args()
    if args.smoke:
        args.proxies, args.budgets, args.per_class = ["digits"], [20.0], 10
    base = {k: v for k, v in os.environ.items() if k not in SERVER_VARS}
    base.update(AUTH_ENABLED="false", LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        proc, url = serve({**base, "DATA_DIR": str(tmp / "data")}, tmp / "serve.log")
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                for name in args.proxies:
                    proxy = proxies.build(name, args.seed, per_class=args.per_class)
                    upload = proxy.write_splits_zip(tmp / f"{name}.zip")
                    with open(upload, "rb") as f:
                        up = client.post("/v1/datasets", files={"file": (upload.name, f)})
                    up.raise_for_status()
                    for budget in args.budgets:
                        try:
                            job = run_job(client, up.json()["id"], budget)
                        except RuntimeError as exc:  # recorded; the other jobs still run
                            failed.append(f"{proxy.describe()}, {budget:g} s: {exc}")
                            print(failed[-1], flush=True)
                            continue
                        rows.append(summarise(proxy.describe(), budget, job))
                        print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
            if args.log:
                args.log.write_text((tmp / "serve.log").read_text(errors="replace"))
    print("\nproxy | budget | wall (used) | size, strategy, epochs run/planned | est. fixed | acc")
    for r in rows:
        print(
            f"{r['proxy']} | {r['budget']:.0f} s | {r['wall']:.1f} s ({r['used']:.0%}) | "
            f"{r['size']} px, {r['strategy']}, {r['epochs_run']}/{r['planned_epochs']} | "
            f"{r['estimated_fixed_seconds']} s | {r['test_accuracy']}"
        )
        print("    phases:", ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if failed:
        sys.exit(f"{len(failed)} job(s) did not succeed: {failed}")
    over = [r for r in rows if r["used"] > OVERRUN]
    if over and not args.smoke:  # a smoke run keeps the script running, on a busy CI host
        sys.exit(f"{len(over)} job(s) overran their budget by more than 10%: {over}")


if __name__ == "__main__":
    main()

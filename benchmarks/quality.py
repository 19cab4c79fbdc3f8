"""Model quality at equal wall-clock budgets: the service's jobs against two hand-written
baselines, on proxy datasets built from packaged data (`benchmarks/proxies.py`).

Per proxy x seed x budget, the methods chosen with `--methods`, each scored on the proxy's
held-out test split:

- `auto` (the service's default): what a user gets by uploading the data and submitting
  `{"time_budget_seconds": budget}`: the upload is ingested (`service.ingest`), then the
  worker's path: the auto recipe (`worker.training.recipe.plan`), the image cache and
  `fit`, with the deadline counted from the start of planning as the worker counts it from
  the job's start. Budget 0: `{}`, the recipe picks the budget (the others then get the
  wall time it took).
- `search`: the same with `"search": {"trials": 8, "budget_seconds": 4 x budget}`.
- `manual`: `recipe: "manual"` (lp_ft at 224 px, the defaults before the auto recipe, on
  today's training code); the clock starts at `prepare`; with `--service-budget total`
  (default) the job's `time_budget_seconds` is what is left after `prepare`. Not
  measured for any service method: the worker's DB writes, uploads and export.
- `(a) full fine-tune`, `(b) logreg on features`: `benchmarks/baselines.py`, reading the
  same upload's `train/` images.

The reported wall time is what each method actually used before its model was ready (the
service's includes its own final validation/test pass; test scoring is outside it for the
baselines). A multi-label proxy (`digits-pairs`) is scored by macro mean average precision
instead of accuracy: the service's upload is then a zip with a CSV manifest whose `labels`
column lists each image's classes (`3|7`) and whose `split` column puts the proxy's test
images in the test split, each 8x16 pair centred on a black 16x16 square (the service
centre-crops; the baselines resize the whole pair to a square); its score is the test mAP
of the job's final report.

    .venv/bin/python benchmarks/quality.py [--proxies digits digits-degraded lfw]
        [--seeds 0 1 2] [--budgets 30 60] [--label-noise 0.0] [--per-class N]
        [--threads N] [--service-budget total|fit] [--json out.json]
    .venv/bin/python benchmarks/quality.py --smoke   # one tiny proxy, one seed, 5 s
    .venv/bin/python benchmarks/quality.py --smoke --proxies digits-pairs  # multi-label
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.baselines import Trained, full_finetune, logreg_on_features  # noqa: E402
from benchmarks.proxies import PROXIES, Proxy, build, read_split_zip  # noqa: E402

AUTO = "service auto recipe"
SERVICE = "service manual (lp_ft 224px)"
FULL_FT, LOGREG = "(a) full fine-tune 128px", "(b) logreg 224px"
METHODS = (AUTO, SERVICE, FULL_FT, LOGREG)
DEVICE = "cpu"  # --device: where every method trains (the service's jobs and the baselines)
SEARCH = "service search (8 trials, 4x budget)"
METHOD_KEYS = {
    "auto": AUTO,
    "manual": SERVICE,
    "full_ft": FULL_FT,
    "logreg": LOGREG,
    "search": SEARCH,
}
SEARCH_TRIALS, SEARCH_FACTOR = 8, 4.0


def load_avg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def score(proxy: Proxy, scores: np.ndarray, targets: np.ndarray) -> float:
    if proxy.multilabel:
        from sklearn.metrics import average_precision_score

        return float(average_precision_score(targets, scores, average="macro"))
    return float(np.mean(scores.argmax(1) == targets))


def test_score(proxy: Proxy, report: dict[str, Any]) -> float:
    """The job's own final report on the test split: mAP (multi-label) or top-1 accuracy."""
    test = report["test"]
    return float(test["map"] if proxy.multilabel else test["top1_accuracy"])


def run_service(proxy: Proxy, upload: Path, budget: float, mode: str, work: Path) -> dict:
    import torch

    from core.jobspec import JobSpec
    from service.ingest import Limits, ingest_archive
    from worker.training.data import prepare
    from worker.training.fit import fit

    with open(upload, "rb") as f:  # the upload: the API's work, before any job runs
        index = ingest_archive(f, work / "images.zip", Limits()).index()
    t0 = time.perf_counter()
    spec = JobSpec(recipe="manual", seed=proxy.seed)
    data = prepare(work / "images.zip", index, spec, work / "cache")
    prepare_s = time.perf_counter() - t0
    fit_budget = budget if mode == "fit" else max(5.0, budget - prepare_s)
    spec = JobSpec(recipe="manual", seed=proxy.seed, time_budget_seconds=fit_budget)
    result = fit(spec, data, device=torch.device(DEVICE))
    wall = time.perf_counter() - t0
    finetune_epochs = [h for h in result.history if h.get("phase") == "fine_tune"]
    return {
        "score": test_score(proxy, result.report),
        "wall": wall,
        "info": {
            "prepare_s": round(prepare_s, 1),
            "fit_budget": round(fit_budget, 1),
            "ft_epochs": len(finetune_epochs),
            "best_epoch": result.best.get("epoch"),
            "stopped": result.stopped_reason,
        },
    }


def run_auto(proxy: Proxy, upload: Path, budget: float | None, work: Path) -> dict:
    """The job a user gets from `{"time_budget_seconds": budget}` (or `{}` when budget is
    None: the recipe picks the budget): ingest, then the worker's path: the auto recipe
    (`worker.training.recipe.plan`), the image cache, `fit` with the deadline counted from
    the start of planning, as the worker counts it from the job's start."""
    import torch

    from core.jobspec import JobConfig, JobSpec
    from service.ingest import Limits, ingest_archive
    from worker.training import recipe
    from worker.training.data import prepare
    from worker.training.fit import fit

    with open(upload, "rb") as f:
        index = ingest_archive(f, work / "images.zip", Limits()).index()
    t0 = time.monotonic()
    fields: dict[str, Any] = {"seed": proxy.seed}
    if budget is not None:
        fields["time_budget_seconds"] = budget
    spec = JobSpec(**fields)
    deadline = t0 + budget if budget is not None else None
    device = torch.device(DEVICE)
    planned = recipe.plan(
        spec, sorted(fields), work / "images.zip", index, device=device, deadline=deadline
    )
    plan_s = time.monotonic() - t0
    # As the worker stores it (worker/planning.py): the config with the recipe's record,
    # which tells fine-tuning that its epochs were chosen, not set (they may grow).
    chosen = JobConfig.model_validate(
        {**planned.spec.to_dict(), "dataset_id": "benchmark", "plan": planned.record}
    )
    if deadline is None:
        deadline = t0 + float(chosen.time_budget_seconds or 0)
    data = prepare(work / "images.zip", index, chosen, work / "cache")
    result = fit(chosen, data, device=device, deadline=deadline)
    wall = time.monotonic() - t0
    ft = [h for h in result.history if h.get("phase") == "fine_tune"]
    probe = [h for h in result.history if h.get("phase") == "probe"]
    val = "val_map" if proxy.multilabel else "val_accuracy"
    return {
        "score": test_score(proxy, result.report),
        "wall": wall,
        "info": {
            "plan_s": round(plan_s, 1),
            "budget": chosen.time_budget_seconds,
            "size": chosen.input_size,
            "strategy": chosen.strategy,
            "planned_epochs": chosen.epochs,
            "ft_epochs": len(ft),
            "best_epoch": result.best.get("epoch"),
            "probe_val": probe[0][val] if probe else None,
            "ft1_val": ft[0][val] if ft else None,
            "hflip": chosen.augmentation.hflip,
            "stopped": result.stopped_reason,
        },
        # The plan's measurements (speeds, planning steps, candidates): printed and in the JSON.
        "plan": {k: planned.record.get(k) for k in ("speed", "candidates", "fitted_epochs")},
    }


def run_search_job(proxy: Proxy, upload: Path, budget: float, work: Path) -> dict:
    """`{"time_budget_seconds": budget, "search": {"trials": 8, "budget_seconds": 4 x
    budget}}`: the auto recipe plans the single job (trial 1), then the search runs around
    it (`worker.training.search`), trials sharing the image caches, as the worker does."""
    import torch

    from core.jobspec import JobSpec
    from core.search import SearchSpec
    from service.ingest import Limits, ingest_archive
    from worker.training import recipe
    from worker.training.data import prepare
    from worker.training.search import run_search

    with open(upload, "rb") as f:
        index = ingest_archive(f, work / "images.zip", Limits()).index()
    t0 = time.monotonic()
    total = budget * SEARCH_FACTOR
    search = SearchSpec(trials=SEARCH_TRIALS, budget_seconds=total)
    spec = JobSpec(seed=proxy.seed, time_budget_seconds=budget, search=search)
    pinned = ["search", "seed", "time_budget_seconds"]
    planned = recipe.plan(
        spec,
        pinned,
        work / "images.zip",
        index,
        device=torch.device(DEVICE),
        deadline=t0 + budget,
    )
    result = run_search(
        planned.spec,
        lambda s: prepare(work / "images.zip", index, s, work / "cache"),
        started=t0,  # the search's budget counts from the job's start, planning included
    )
    wall = time.monotonic() - t0
    trials = result.extra["search"]["trials"]
    return {
        "score": test_score(proxy, result.report),
        "wall": wall,
        "info": {
            "budget": total,
            "trials": sum("retrains" not in t for t in trials),
            "pruned": sum(t["state"] == "pruned" for t in trials),
            "best_trial": result.extra["search"]["best_trial"],
            "trials_run": [
                f"{'final ' if 'retrains' in t else ''}{t['params'].get('strategy')} "
                f"{t['params']['image_size']}px {t['params']['epochs']}ep {t['state']} "
                f"{t['value']} {t.get('seconds')}s best_epoch {t.get('best_epoch')} "
                f"{t.get('stopped_reason') or t.get('reason') or ''}".rstrip()
                for t in trials
            ],
        },
    }


def run_baseline(method: str, proxy: Proxy, upload: Path | None, budget: float) -> dict:
    if upload is not None:

        def load() -> tuple[list, np.ndarray]:
            images, names = read_split_zip(upload, "train")
            return images, np.array([proxy.classes.index(n) for n in names])

        test_images, test_names = read_split_zip(upload, "test")
        targets = np.array([proxy.classes.index(n) for n in test_names])
    else:  # multi-label: no folder layout, the arrays as images
        from PIL import Image

        def load() -> tuple[list, np.ndarray]:
            imgs = [Image.fromarray(proxy.images[i]) for i in proxy.train_idx]
            return imgs, proxy.labels[proxy.train_idx]

        test_images = [Image.fromarray(proxy.images[i]) for i in proxy.test_idx]
        targets = proxy.labels[proxy.test_idx]
    train = full_finetune if method == FULL_FT else logreg_on_features
    trained: Trained = train(load, len(proxy.classes), budget, proxy.seed, device=DEVICE)
    return {
        "score": score(proxy, trained.predict(test_images), targets),
        "wall": trained.seconds,
        "info": trained.info,
    }


def same_wall(budget: float, done: dict[str, dict]) -> float:
    """The budget; with 0 (auto chose its own), the wall time the auto job took."""
    return budget or float(done.get(AUTO, {}).get("wall") or 60.0)


def run_one(proxy: Proxy, budget: float, mode: str, methods: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for method in methods:
        # Each method in its own folder: no cache is shared between them.
        work = Path(tempfile.mkdtemp(prefix="quality-"))
        try:
            upload = None if proxy.multilabel else proxy.write_splits_zip(work / "upload.zip")
            if method == SEARCH:
                if upload is None:
                    upload = proxy.write_manifest_zip(work / "upload.zip", square=True)
                out[method] = run_search_job(proxy, upload, same_wall(budget, out), work)
            elif method in (SERVICE, AUTO):
                if upload is None:  # multi-label: a manifest with `labels` (module docstring)
                    upload = proxy.write_manifest_zip(work / "upload.zip", square=True)
                if method == AUTO:
                    out[method] = run_auto(proxy, upload, budget or None, work)
                else:
                    out[method] = run_service(proxy, upload, same_wall(budget, out), mode, work)
            else:
                out[method] = run_baseline(method, proxy, upload, same_wall(budget, out))
            r = out[method]
            print(
                f"  {proxy.name} seed {proxy.seed} budget {budget:g}s {method}: "
                f"{r['score']:.4f} in {r['wall']:.1f}s {r['info']}",
                flush=True,
            )
            if r.get("plan"):
                print(f"    plan: {r['plan']}", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


def table(results: list[dict[str, Any]], metric_of: dict[str, str]) -> str:
    rows = [
        "| proxy | budget | method | test score (mean) | per seed | wall s (mean / max) | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    keys: dict[tuple[str, float, str], list[dict]] = {}
    for r in results:
        keys.setdefault((r["proxy"], r["budget"], r["method"]), []).append(r)
    for (proxy, budget, method), rs in keys.items():
        scores = [r["score"] for r in rs]
        walls = [r["wall"] for r in rs]
        info = rs[0]["info"]
        note = ", ".join(
            f"{k} {'/'.join(str(r['info'].get(k)) for r in rs)}"
            for k in info
            if k
            in ("ft_epochs", "stopped", "epochs", "images_used", "size", "budget", "best_epoch")
        )
        rows.append(
            f"| {proxy} ({metric_of[proxy]}) | {budget:g} s | {method} | "
            f"{statistics.mean(scores):.4f} | {', '.join(f'{s:.4f}' for s in scores)} | "
            f"{statistics.mean(walls):.1f} / {max(walls):.1f} | {note} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--proxies", nargs="+", help="default: digits digits-degraded lfw (--smoke: digits)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", type=float, nargs="+", default=[30.0, 60.0])
    p.add_argument("--label-noise", type=float, default=0.0)
    p.add_argument("--service-budget", choices=["total", "fit"], default="total")
    p.add_argument("--per-class", type=int, help="keep this many images of each class")
    p.add_argument("--threads", type=int, help="torch threads for every method (default: torch's)")
    p.add_argument("--json", type=Path, help="also write every run's numbers here")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where every method trains (default cpu; cuda: the service's jobs and the "
        "baselines on the GPU, each as written: the service with its autocast, the "
        "baselines in plain fp32)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHOD_KEYS),
        default=["auto", "manual", "full_ft", "logreg"],
        help="auto: the service's default (auto recipe); manual: lp_ft at 224 px as before "
        "the recipe; full_ft, logreg: the hand-written baselines. Budget 0 runs auto with "
        "the budget it chooses itself (the others then get that wall time); search: 8 "
        "trials in 4x the budget (not run by default)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="10 per class (digits-pairs: 100 pairs), seed 0, 5 s; digits unless --proxies",
    )
    args = p.parse_args()
    smoke_proxies = ["digits"] if args.smoke else ["digits", "digits-degraded", "lfw"]
    args.proxies = args.proxies or smoke_proxies
    for name in args.proxies:
        if name not in PROXIES:
            p.error(f"unknown proxy {name!r}; available: {', '.join(PROXIES)}")
    per_class = args.per_class
    if args.smoke:
        args.seeds, args.budgets, per_class = [0], [5.0], 10

    import torch

    global DEVICE
    DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"start: {load_avg()}, torch threads {torch.get_num_threads()}", flush=True)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    metric_of: dict[str, str] = {}
    for name in args.proxies:
        for seed in args.seeds:
            proxy = build(name, seed, label_noise=args.label_noise, per_class=per_class)
            metric_of[proxy.name] = "mAP" if proxy.multilabel else "accuracy"
            print(proxy.describe(), flush=True)
            for budget in args.budgets:
                methods = [METHOD_KEYS[m] for m in args.methods]
                for method, r in run_one(proxy, budget, args.service_budget, methods).items():
                    results.append(
                        {"proxy": proxy.name, "seed": seed, "budget": budget, "method": method} | r
                    )
    print(
        f"\nend: {load_avg()}; benchmark took {time.perf_counter() - started:.0f} s; "
        f"service budget mode: {args.service_budget}; label noise {args.label_noise:g}\n"
    )
    results.sort(key=lambda r: (args.proxies.index(r["proxy"].split("[")[0]), r["budget"]))
    print(table(results, metric_of))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

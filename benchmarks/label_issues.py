"""Label issues (confident learning, `worker/training/label_issues.py`): are the labels we
flip found, and what do they cost next to the job?

Per proxy x seed: the proxy (`benchmarks/proxies.py`) with 5% of its training labels moved
to another class (`label_noise`; the test split stays clean and unused), uploaded as a user
would (train/<class>/*.png), then the job the worker runs for `{"time_budget_seconds": B}`
(the auto recipe, the image cache, `fit`, counted from the start of planning as the worker
counts from the job's start), then `find_label_issues` on what the job left, as the worker
calls it after export (sheets drawn; the store uploads are not counted). Reported:

- recall@2F: the share of the F flipped images among the first 2F listed (the target:
  at least 0.70); precision@2F is the share of those 2F that were flipped. F counts the
  flipped images the job checked: its training and validation images, which under a short
  budget on a CPU are fewer than were uploaded (the recipe's `max_train_images`);
- the list's length and the recall of the whole list;
- the cost: the label issues' seconds as a share of the job's (target: at most 10%);
- recall@2F of the same job's label issues with the probes on the raw features (no signed
  square root, `find_label_issues(power=False)`, the method before), for comparison.

    .venv/bin/python benchmarks/label_issues.py [--proxies digits digits-degraded lfw]
        [--seeds 0 1 2] [--budget 30] [--noise 0.05] [--threads 1] [--json out.json]
    .venv/bin/python benchmarks/label_issues.py --smoke   # 20 digits a class, 5 s jobs
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.proxies import Proxy, build  # noqa: E402
from benchmarks.quality import load_avg  # noqa: E402

RECALL_TARGET, COST_TARGET = 0.70, 0.10


def run_one(proxy: Proxy, budget: float, work: Path, sheets: Path | None = None) -> dict[str, Any]:
    """The job, then its label issues; the figures of one proxy x seed. With `sheets`, the
    two sheets are written there."""
    import torch

    from core.duplicates import duplicate_group_ids
    from core.jobspec import JobSpec
    from service.ingest import Limits, ingest_archive
    from worker.training import recipe
    from worker.training.data import prepare
    from worker.training.fit import fit
    from worker.training.label_issues import find_label_issues

    upload = proxy.write_splits_zip(work / "upload.zip")
    with open(upload, "rb") as f:
        index = ingest_archive(f, work / "images.zip", Limits()).index()
    t0 = time.monotonic()
    fields: dict[str, Any] = {"seed": proxy.seed, "time_budget_seconds": budget}
    device = torch.device("cpu")
    planned = recipe.plan(
        JobSpec(**fields),
        sorted(fields),
        work / "images.zip",
        index,
        device=device,
        deadline=t0 + budget,
    )
    spec = planned.spec
    data = prepare(work / "images.zip", index, spec, work / "cache")
    result = fit(spec, data, deadline=t0 + budget)
    job_s = time.monotonic() - t0

    entries = index["entries"]
    paths = [e.get("source") or e["path"] for e in entries]
    t1 = time.monotonic()
    found = find_label_issues(result, data, spec, paths, duplicate_group_ids(entries), device)
    issues_s = time.monotonic() - t1
    raw = find_label_issues(
        result, data, spec, paths, duplicate_group_ids(entries), device, sheets=False, power=False
    )
    if sheets is not None:
        sheets.mkdir(parents=True, exist_ok=True)
        for kind, png in (("label_issues", found.issues_png), ("top_losses", found.top_losses_png)):
            if png is not None:
                (sheets / f"{proxy.name}-{proxy.seed}-{kind}.png").write_bytes(png)

    # Uploaded as train/<class>/<proxy index>.png. The job checks the images it computed
    # features of (train + validation; the recipe may train on fewer than were uploaded):
    # F is the flipped images among those.
    proxy_index = [int(Path(p).stem) for p in paths]
    checked = {proxy_index[j] for j in (*data.train_idx, *data.val_idx)}
    flipped = {int(i) for i in proxy.flipped} & checked
    listed = [proxy_index[item["index"]] for item in found.issues]
    first = listed[: 2 * len(flipped)]
    hits = len(flipped & set(first))
    raw_first = [proxy_index[item["index"]] for item in raw.issues][: 2 * len(flipped)]
    val = result.report.get("validation", {})
    return {
        "flipped_uploaded": len(proxy.flipped),
        "uploaded": len(proxy.train_idx),
        "flipped": len(flipped),
        "checked": found.images,
        "listed": len(listed),
        "recall_2f": hits / max(1, len(flipped)),
        "recall_2f_raw": len(flipped & set(raw_first)) / max(1, len(flipped)),
        "precision_2f": hits / max(1, len(first)),
        "recall_all": len(flipped & set(listed)) / max(1, len(flipped)),
        "job_s": job_s,
        "issues_s": issues_s,
        "share": issues_s / job_s,
        "timings": found.timings,
        "features": found.features,
        "penalty": found.penalty,
        "strategy": spec.strategy,
        "size": spec.input_size,
        "val_accuracy": val.get("top1_accuracy"),
    }


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| proxy | flipped of the images checked (uploaded) | recall@2F (mean, per seed) "
        "| precision@2F | listed | recall of the whole list | job s | label issues s "
        "| share of job (mean / max) | recall@2F on raw features (before) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["proxy"], []).append(r)
    for proxy, rs in by.items():
        mean = statistics.mean
        rows.append(
            f"| {proxy} | {'/'.join(str(r['flipped']) for r in rs)} of "
            f"{'/'.join(str(r['checked']) for r in rs)} "
            f"({'/'.join(str(r['flipped_uploaded']) for r in rs)} of {rs[0]['uploaded']}) "
            f"| **{mean(r['recall_2f'] for r in rs):.3f}** "
            f"[{' '.join(format(r['recall_2f'], '.3f') for r in rs)}] "
            f"| {mean(r['precision_2f'] for r in rs):.3f} "
            f"| {'/'.join(str(r['listed']) for r in rs)} "
            f"| {mean(r['recall_all'] for r in rs):.3f} "
            f"| {mean(r['job_s'] for r in rs):.1f} | {mean(r['issues_s'] for r in rs):.2f} "
            f"| **{100 * mean(r['share'] for r in rs):.1f}%** / "
            f"{100 * max(r['share'] for r in rs):.1f}% "
            f"| {mean(r['recall_2f_raw'] for r in rs):.3f} "
            f"[{' '.join(format(r['recall_2f_raw'], '.3f') for r in rs)}] |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--proxies", nargs="+", default=["digits", "digits-degraded", "lfw"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=float, default=30.0, help="the job's time_budget_seconds")
    p.add_argument("--noise", type=float, default=0.05, help="share of training labels flipped")
    p.add_argument("--per-class", type=int, help="keep this many images of each class")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, help="also write every run's numbers here")
    p.add_argument("--sheets", type=Path, help="write each job's two sheets (PNG) here")
    p.add_argument("--smoke", action="store_true", help="digits, 20 a class, seed 0, 5 s job")
    args = p.parse_args()
    if args.smoke:
        args.proxies, args.seeds, args.budget, args.per_class = ["digits"], [0], 5.0, 20

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"start: {load_avg()}, torch threads {torch.get_num_threads()}", flush=True)
    started = time.perf_counter()
    results = []
    for name in args.proxies:
        for seed in args.seeds:
            proxy = build(name, seed, label_noise=args.noise, per_class=args.per_class)
            work = Path(tempfile.mkdtemp(prefix="label-issues-"))
            try:
                r = {"proxy": proxy.name, "seed": seed} | run_one(
                    proxy, args.budget, work, args.sheets
                )
            finally:
                shutil.rmtree(work, ignore_errors=True)
            results.append(r)
            print(
                f"  {proxy.describe()}: recall@2F {r['recall_2f']:.3f} "
                f"(raw features {r['recall_2f_raw']:.3f}) precision@2F "
                f"{r['precision_2f']:.3f}, {r['listed']} listed, {r['issues_s']:.2f} s of a "
                f"{r['job_s']:.1f} s job ({100 * r['share']:.1f}%) {r['timings']}, "
                f"{r['features']} features, penalty {r['penalty']:g}, {r['strategy']} at "
                f"{r['size']} px, val accuracy {r['val_accuracy']}",
                flush=True,
            )
    print(
        f"\nend: {load_avg()}; benchmark took {time.perf_counter() - started:.0f} s; "
        f"job budget {args.budget:g} s, {args.noise:.0%} of training labels flipped\n"
    )
    print(table(results))
    recall = min(
        statistics.mean(r["recall_2f"] for r in results if r["proxy"] == name)
        for name in {r["proxy"] for r in results}
    )
    share = max(r["share"] for r in results)
    print(
        f"\nworst proxy's mean recall@2F {recall:.3f} (target >= {RECALL_TARGET}); "
        f"largest share of a job {share:.1%} (target <= {COST_TARGET:.0%})"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

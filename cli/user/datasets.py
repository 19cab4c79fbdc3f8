"""`finetune datasets upload|list|show|delete`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from cli.user.output import Json, api_errors, console, err, print_json, size, table, when
from client import models as m

app = typer.Typer(help="upload datasets and read their ingest reports", no_args_is_help=True)


def byte_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


@app.command()
def upload(
    ctx: typer.Context,
    path: Annotated[
        Path, typer.Argument(help="a folder (zipped while it streams), a zip or a tar")
    ],
    name: Annotated[str | None, typer.Option(help="a name for the dataset")] = None,
    as_json: Json = False,
) -> None:
    """Upload a dataset: ImageFolder (one folder per class), train/val/test folders, or a
    manifest (CSV); then print its ingest report."""
    with api_errors(as_json):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: give a folder, a .zip or a .tar")
        client = ctx.obj()
        if as_json:
            ds = client.datasets.upload(path, name=name)
            print_json(ds)
            return
        with byte_bar() as bar:
            task = bar.add_task(f"uploading {path.name}", total=None)

            def progress(sent: int, total: int | None) -> None:
                bar.update(task, completed=sent, total=total)

            ds = client.datasets.upload(path, name=name, progress=progress)
            bar.update(task, description="ingested")
        show_report(ds)


@app.command("list")
def list_(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    as_json: Json = False,
) -> None:
    """The tenant's datasets, newest first."""
    with api_errors(as_json):
        page = ctx.obj().datasets.list(limit=limit, offset=offset)
        if as_json:
            print_json(page)
            return
        rows = [
            [
                d.id,
                d.name,
                d.num_images,
                d.num_classes,
                d.task,
                size(d.size_bytes),
                when(d.created_at),
            ]
            for d in page.data
        ]
        console.print(
            table(
                f"{len(page.data)} of {page.count} datasets",
                ["id", "name", "images", "classes", "task", "size", "created"],
                rows,
            )
        )


@app.command()
def show(ctx: typer.Context, dataset_id: str, as_json: Json = False) -> None:
    """A dataset's ingest report: classes per split, rejected files, duplicates, leakage."""
    with api_errors(as_json):
        ds = ctx.obj().datasets.get(dataset_id)
        if as_json:
            print_json(ds)
        else:
            show_report(ds)


@app.command()
def delete(ctx: typer.Context, dataset_id: str, as_json: Json = False) -> None:
    """Delete a dataset (refused while a job uses it)."""
    with api_errors(as_json):
        ctx.obj().datasets.delete(dataset_id)
        if as_json:
            print_json({"id": dataset_id, "deleted": True})
        else:
            console.print(f"deleted dataset {dataset_id}")


def _examples(groups: list[list[dict]], limit: int = 5) -> list[list[str]]:
    return [
        [", ".join(f"{e['path']} ({e['class']}, {e.get('split') or '-'})" for e in g)]
        for g in groups[:limit]
    ]


def show_report(ds: m.Dataset) -> None:
    console.print(
        f"[bold]dataset {ds.id}[/bold] {ds.name!r}: {ds.num_images} images, "
        f"{ds.num_classes} classes, {ds.task}, {ds.layout} ({ds.format}), {size(ds.size_bytes)}"
    )
    splits = sorted(ds.splits)
    rows = [[c.name, c.count, *(ds.splits[s].get(c.name, 0) for s in splits)] for c in ds.classes]
    title = "classes" + (f" (imbalance ratio {ds.imbalance_ratio})" if ds.imbalance_ratio else "")
    console.print(table(title, ["class", "images", *splits], rows))
    if ds.num_rejected or ds.num_skipped:
        issues = [[f.path, "rejected", f.reason] for f in ds.rejected]
        issues += [[f.path, "skipped", f.reason] for f in ds.skipped]
        title = f"{ds.num_rejected} rejected, {ds.num_skipped} skipped"
        console.print(table(title, ["file", "", "why"], issues))
    dup = ds.duplicates or {}
    if dup.get("exact_groups") or dup.get("near_groups"):
        title = f"duplicates: {dup.get('exact_groups', 0)} exact, {dup.get('near_groups', 0)} near"
        examples = _examples(dup.get("exact", []) + dup.get("near", []))
        console.print(table(title, ["images in one group"], examples))
    leak = ds.leakage or {}
    if leak.get("groups"):
        title = f"[red]leakage: {leak['groups']} groups[/red] {leak.get('detail') or ''}"
        console.print(table(title, ["images in one group"], _examples(leak.get("examples", []))))
    conflicts = ds.conflicting_labels or {}
    if conflicts.get("groups"):
        title = f"conflicting labels: {conflicts['groups']} groups of identical images"
        console.print(
            table(title, ["images in one group"], _examples(conflicts.get("examples", [])))
        )
    if ds.label_cardinality and ds.task == "multi-label":
        console.print(f"labels per image: {ds.label_cardinality}")

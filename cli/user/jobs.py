"""`finetune jobs submit|list|show|cancel|watch|download`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from cli.user.datasets import byte_bar
from cli.user.output import (
    JOB_FAILED,
    OK,
    Json,
    api_errors,
    console,
    err,
    pct,
    print_json,
    table,
    when,
)
from client import Client
from client import models as m

app = typer.Typer(help="submit, follow and download training jobs", no_args_is_help=True)
FORMATS = ["zip", "onnx", "onnx_int8", "safetensors", "torchscript", "metadata", "card"]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word: a string


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`--param epochs=3 --param augmentation='{"hflip": false}'`: values are JSON where
    they parse as JSON, else strings."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE (e.g. epochs=3)")
        out[key.strip()] = _value(value)
    return out


def eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA -"
    minutes, secs = divmod(int(seconds), 60)
    return (
        f"ETA {minutes}:{secs:02d}" if minutes < 60 else f"ETA {minutes // 60}h{minutes % 60:02d}"
    )


def describe(job: m.Job) -> dict[str, str]:
    p = job.progress
    val = (job.latest_metrics or {}).get("val_accuracy")
    return {
        "description": f"{job.status}/{p.phase or '-'}",
        "epoch": f"epoch {p.epoch}/{p.total_epochs}",
        "eta": eta(p.eta_seconds) if job.status == "running" else "",
        "val": f"val acc {pct(val)}" if val is not None else "",
    }


def live(client: Client, job_id: str) -> m.Job:
    """Follow the job with a live bar (phase, epoch, percent, step, ETA, validation
    accuracy) on stderr until it ends; return it."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        TextColumn("{task.fields[epoch]}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("step {task.completed:.0f}/{task.fields[steps]}"),
        TextColumn("{task.fields[eta]}"),
        TextColumn("{task.fields[val]}"),
        console=err,
    )
    with bar:
        task = bar.add_task("queued", total=None, epoch="", steps="-", eta="", val="")

        def show(j: m.Job) -> None:
            p = j.progress
            total = p.total_steps or None
            done = total if j.status == "succeeded" and total else p.step
            d = describe(j)
            bar.update(
                task,
                total=total,
                completed=done,
                description=d["description"],
                epoch=d["epoch"],
                steps=total or "-",
                eta=d["eta"],
                val=d["val"],
            )

        return client.jobs.wait(job_id, callback=show)


def follow(client: Client, job_id: str, as_json: bool) -> int:
    """Wait for the job (drawing the bar unless --json); the exit code says how it ended."""
    job = client.jobs.wait(job_id) if as_json else live(client, job_id)
    ended(job, as_json)
    return OK if job.status == "succeeded" else JOB_FAILED


def ended(job: m.Job, as_json: bool) -> None:
    if as_json:
        print_json(job)
        return
    best = job.best_metrics or {}
    if job.status == "succeeded":
        console.print(
            f"job {job.id} [green]succeeded[/green]: best validation accuracy "
            f"{pct(best.get('val_accuracy'))} (epoch {best.get('epoch', '-')})"
        )
    else:
        why = f": {job.error.code}: {job.error.message}" if job.error else ""
        console.print(f"job {job.id} [red]{job.status}[/red]{why}")
    for warning in job.warnings:
        console.print(f"[yellow]warning[/yellow] {warning}")


@app.command()
def submit(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="the dataset's id")],
    backbone: Annotated[str | None, typer.Option(help="see `GET /v1/backbones`")] = None,
    budget: Annotated[
        float | None, typer.Option(help="time budget in seconds (the auto recipe fits it)")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    image_size: Annotated[int | None, typer.Option(min=16)] = None,
    recipe: Annotated[str | None, typer.Option(help="auto (default) or manual")] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="any job spec field: KEY=JSON")
    ] = None,
    watch: Annotated[bool, typer.Option(help="follow it until it ends")] = False,
    as_json: Json = False,
) -> None:
    """Queue a fine-tuning job; with --watch, follow it (exit 1 if it fails)."""
    spec = {
        "backbone": backbone,
        "time_budget_seconds": budget,
        "epochs": epochs,
        "image_size": image_size,
        "recipe": recipe,
        **parse_params(param or []),
    }
    with api_errors(as_json):
        client = ctx.obj()
        job = client.jobs.submit(dataset, **spec)
        if not watch:
            if as_json:
                print_json(job)
            else:
                console.print(f"submitted job {job.id} ({job.status})")
            return
        if not as_json:
            console.print(f"submitted job {job.id}")
        code = follow(client, job.id, as_json)
    raise typer.Exit(code)


@app.command()
def watch(ctx: typer.Context, job_id: str, as_json: Json = False) -> None:
    """Follow a job until it ends (exit 0: succeeded, 1: failed or canceled)."""
    with api_errors(as_json):
        code = follow(ctx.obj(), job_id, as_json)
    raise typer.Exit(code)


@app.command("list")
def list_(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="queued, running, succeeded, ...")] = None,
    dataset: Annotated[str | None, typer.Option(help="jobs on this dataset")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    as_json: Json = False,
) -> None:
    """The tenant's jobs, newest first."""
    with api_errors(as_json):
        page = ctx.obj().jobs.list(status=status, dataset_id=dataset, limit=limit, offset=offset)
        if as_json:
            print_json(page)
            return
        rows = [
            [
                j.id,
                j.status,
                j.config.get("backbone"),
                j.dataset_id,
                f"{100 * j.progress.fraction:.0f}%",
                pct((j.best_metrics or {}).get("val_accuracy")),
                when(j.created_at),
            ]
            for j in page.data
        ]
        columns = ["id", "status", "backbone", "dataset", "progress", "best val acc", "created"]
        console.print(table(f"{len(page.data)} of {page.count} jobs", columns, rows))


@app.command()
def show(ctx: typer.Context, job_id: str, as_json: Json = False) -> None:
    """A job: status, progress, its configuration, metrics and error."""
    with api_errors(as_json):
        job = ctx.obj().jobs.get(job_id)
        if as_json:
            print_json(job)
            return
        d = describe(job)
        p = job.progress
        console.print(
            f"[bold]job {job.id}[/bold] {d['description']} {d['epoch']} step "
            f"{p.step}/{p.total_steps} {d['eta']} {d['val']}"
        )
        keys = ["recipe", "backbone", "strategy", "epochs", "image_size", "time_budget_seconds"]
        rows = [[k, job.config.get(k)] for k in keys if k in job.config]
        rows += [["dataset", job.dataset_id], ["model available", job.model_available]]
        best = job.best_metrics or {}
        if best:
            rows.append(
                ["best epoch", f"{best.get('epoch')}: val acc {pct(best.get('val_accuracy'))}"]
            )
        if job.error:
            rows.append(["error", f"{job.error.code}: {job.error.message}"])
        console.print(table(None, ["", ""], rows))
        for warning in job.warnings:
            console.print(f"[yellow]warning[/yellow] {warning}")


@app.command()
def cancel(
    ctx: typer.Context,
    job_id: str,
    keep: Annotated[bool, typer.Option(help="stop and keep the best model so far")] = False,
    as_json: Json = False,
) -> None:
    """Cancel a queued or running job."""
    with api_errors(as_json):
        job = ctx.obj().jobs.cancel(job_id, mode="stop-and-keep" if keep else "discard")
        if as_json:
            print_json(job)
        else:
            asked = " (stopping)" if job.status == "running" else ""
            console.print(f"job {job.id}: {job.status}{asked}")


@app.command()
def download(
    ctx: typer.Context,
    job_id: str,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="a file or a folder (default: here)")
    ] = None,
    format: Annotated[str, typer.Option(help=", ".join(FORMATS))] = "zip",  # noqa: A002
    as_json: Json = False,
) -> None:
    """Download a finished job's model."""
    if format not in FORMATS:
        raise typer.BadParameter(
            f"{format!r} is not one of {', '.join(FORMATS)}", param_hint="--format"
        )
    with api_errors(as_json):
        client = ctx.obj()
        if as_json:
            path = client.jobs.download(job_id, output, format=format)
            print_json(
                {
                    "job_id": job_id,
                    "format": format,
                    "path": str(path),
                    "bytes": path.stat().st_size,
                }
            )
            return
        with byte_bar() as bar:
            task = bar.add_task(f"downloading {format}", total=None)
            path = client.jobs.download(
                job_id,
                output,
                format=format,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        console.print(f"saved {path}")

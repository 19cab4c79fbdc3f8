"""`finetune predict MODEL IMAGE...` and `finetune models list|show|download`. MODEL is a
job id or a registry reference (a model id, `name`, `name@3`, `name@production`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.user.datasets import byte_bar
from cli.user.jobs import FORMATS
from cli.user.output import Json, api_errors, console, pct, print_json, table
from client import Client
from client import models as m

app = typer.Typer(help="the model registry: list, show, download", no_args_is_help=True)


def predict_any(client: Client, model: str, images: list[Path], top_k: int) -> m.Predictions:
    """A job id (`job_…`) asks the job; anything else is a registry reference."""
    if model.startswith("job_"):
        return client.jobs.predict(model, images, top_k=top_k)
    return client.models.predict(model, images, top_k=top_k)


def predict(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="a job id or a model reference (name@stage)")],
    images: Annotated[list[Path], typer.Argument(help="one or more image files")],
    top_k: Annotated[int, typer.Option(min=1, max=1000, help="classes per image")] = 3,
    as_json: Json = False,
) -> None:
    """Classify images with a trained model (runs on the service)."""
    with api_errors(as_json):
        for image in images:
            if not image.is_file():
                raise FileNotFoundError(f"{image} is not a file")
        result = predict_any(ctx.obj(), model, images, top_k)
        if as_json:
            print_json(result)
            return
        rows = []
        for p in result.data:
            best = ", ".join(f"{s.label} {pct(s.probability)}" for s in p.top)
            rows.append([p.filename, ", ".join(p.labels) if p.labels is not None else "", best])
        columns = ["image", "labels" if result.task == "multi-label" else "", f"top {top_k}"]
        console.print(table(f"{result.backbone}, job {result.job_id}", columns, rows))


@app.command("list")
def list_(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option()] = None,
    stage: Annotated[str | None, typer.Option(help="none, staging, production, archived")] = None,
    tag: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    as_json: Json = False,
) -> None:
    """Registered models, newest first."""
    with api_errors(as_json):
        page = ctx.obj().models.list(name=name, stage=stage, tag=tag, limit=limit)
        if as_json:
            print_json(page)
            return
        rows = [
            [
                f"{x.name}@{x.version}",
                x.id,
                x.stage,
                ",".join(x.tags),
                x.backbone,
                pct((x.metrics or {}).get("val_accuracy")),
                x.job_id,
            ]
            for x in page.data
        ]
        columns = ["model", "id", "stage", "tags", "backbone", "val acc", "job"]
        console.print(table(f"{len(page.data)} of {page.count} models", columns, rows))


@app.command()
def show(ctx: typer.Context, ref: str, as_json: Json = False) -> None:
    """One registered model."""
    with api_errors(as_json):
        x = ctx.obj().models.get(ref)
        if as_json:
            print_json(x)
            return
        rows = [
            ["id", x.id],
            ["stage", x.stage],
            ["tags", ", ".join(x.tags)],
            ["backbone", x.backbone],
            ["job", x.job_id],
            ["dataset", x.dataset_id],
            ["val acc", pct((x.metrics or {}).get("val_accuracy"))],
        ]
        console.print(table(f"{x.name}@{x.version}", ["", ""], rows))


@app.command()
def download(
    ctx: typer.Context,
    ref: str,
    output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
    format: Annotated[str, typer.Option(help=", ".join(FORMATS))] = "zip",  # noqa: A002
    as_json: Json = False,
) -> None:
    """Download a registered model."""
    if format not in FORMATS:
        raise typer.BadParameter(f"{format!r} is not one of {', '.join(FORMATS)}")
    with api_errors(as_json):
        client = ctx.obj()
        with byte_bar() as bar:
            task = bar.add_task(f"downloading {format}", total=None, visible=not as_json)
            path = client.models.download(
                ref,
                output,
                format=format,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        if as_json:
            print_json({"ref": ref, "format": format, "path": str(path)})
        else:
            console.print(f"saved {path}")

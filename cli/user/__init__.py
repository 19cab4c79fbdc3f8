"""The user's commands (typer): login, datasets, jobs, predict, models. `cli/main.py` hands
them these names; the operator commands (serve, worker, tenants, ...) stay argparse there.
Exit codes: see `cli/user/output.py`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated

import typer

from cli.user import datasets, jobs, models
from cli.user.config import config_path, make_client, resolve, save
from cli.user.output import Json, api_errors, console, print_json

app = typer.Typer(
    name="finetune",
    help="Fine-tune image classifiers on a finetune service. Exit codes: 0 ok, 1 the job "
    "failed or was canceled, 2 usage, 3 the API refused (4xx), 4 server or network error.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(datasets.app, name="datasets")
app.add_typer(jobs.app, name="jobs")
app.add_typer(models.app, name="models")
app.command("predict")(models.predict)


@app.callback()
def root(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(help="the service (else FINETUNE_URL, login)")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="an API key (else FINETUNE_API_KEY, login)")
    ] = None,
) -> None:
    # A factory, so `--help` and `login` never need a working configuration.
    ctx.obj = lambda: make_client(url, api_key)


@app.command()
def login(
    url: Annotated[str | None, typer.Option(help="the service's base URL")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="an API key (asked for when not given; empty: no auth)")
    ] = None,
    verify: Annotated[bool, typer.Option(help="check the key against the service")] = True,
    as_json: Json = False,
) -> None:
    """Save the service's URL and your API key in a file only you can read. FINETUNE_URL
    and FINETUNE_API_KEY, when set, win over the file."""
    current_url, _ = resolve()
    url = url or typer.prompt("service URL", default=current_url)
    if api_key is None:
        api_key = typer.prompt("API key (empty if auth is off)", default="", hide_input=True)
    with api_errors(as_json):
        me = None
        if verify:
            with make_client(url, api_key) as client:
                me = client.me()
        path = save(url.rstrip("/"), api_key or None)
        if as_json:
            print_json(
                {"url": url, "config": str(path), "me": me.model_dump(mode="json") if me else None}
            )
        else:
            who = f" as tenant {me.tenant_name!r} ({', '.join(me.scopes)})" if me else ""
            console.print(f"logged in to {url}{who}; saved in {path}")


@app.command()
def logout() -> None:
    """Forget the saved URL and key."""
    path = config_path()
    path.unlink(missing_ok=True)
    console.print(f"removed {path}")


@app.command()
def whoami(ctx: typer.Context, as_json: Json = False) -> None:
    """The service, the tenant and the scopes of the key in use."""
    with api_errors(as_json), ctx.obj() as client:
        me = client.me()
        if as_json:
            print_json(me)
        else:
            console.print(
                f"{client.base_url}: tenant {me.tenant_name!r} ({me.tenant_id}), key "
                f"{me.key_id or '-'}, scopes {', '.join(me.scopes)}, auth "
                f"{'on' if me.auth_enabled else 'off'}"
            )


def run(argv: Sequence[str]) -> int:
    """Run a user command; its exit code (typer's usage errors are 2)."""
    command = typer.main.get_command(app)
    try:
        command.main(args=list(argv), prog_name="finetune", standalone_mode=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 2
    return 0

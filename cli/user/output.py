"""Printing for people (rich) and for scripts (`--json`), and the exit codes:

  0  done (a watched job succeeded)
  1  a watched job failed or was canceled
  2  usage: a bad option or argument (typer)
  3  the API refused the request (4xx: not found, invalid, not allowed)
  4  the service failed or could not be reached (5xx, network)
130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from client import ApiError

OK, JOB_FAILED, USAGE, API_ERROR, SERVER_ERROR, INTERRUPTED = 0, 1, 2, 3, 4, 130

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

Json = Annotated[bool, typer.Option("--json", help="print JSON for scripts instead of tables")]


def plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(plain(value), indent=2, default=str) + "\n")
    sys.stdout.flush()


def exit_code_of(exc: ApiError) -> int:
    return API_ERROR if exc.is_client_error else SERVER_ERROR


@contextmanager
def api_errors(as_json: bool) -> Iterator[None]:
    """An API error becomes its message (JSON on stdout with --json) and its exit code."""
    try:
        yield
    except ApiError as exc:
        if as_json:
            print_json({"status": exc.status, "error_code": exc.error_code, "detail": exc.detail})
        else:
            where = f"{exc.status} " if exc.status else ""
            err.print(f"[red]error[/red] {where}{exc.error_code}: {exc.detail}", markup=True)
        raise typer.Exit(exit_code_of(exc)) from None
    except (FileNotFoundError, ValueError, TimeoutError) as exc:
        if as_json:
            print_json({"status": None, "error_code": type(exc).__name__, "detail": str(exc)})
        else:
            err.print(f"[red]error[/red] {exc}")
        raise typer.Exit(USAGE if not isinstance(exc, TimeoutError) else SERVER_ERROR) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(INTERRUPTED) from None


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for i, c in enumerate(columns):
        # The first column is the id a user copies: never folded.
        t.add_column(c, overflow="fold", no_wrap=i == 0)
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    return t


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def when(at: datetime | None) -> str:
    """A time in the user's zone, to the minute."""
    return "-" if at is None else at.astimezone().strftime("%Y-%m-%d %H:%M")


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"

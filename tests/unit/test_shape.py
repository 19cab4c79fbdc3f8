"""Rules that keep the shape of ARCHITECTURE.md: layers (import-linter), what each process
loads, and modules small enough to read."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "service", "worker", "cli", "client")
MAX_MODULE_LINES = 400


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return {name.split(".")[0] for name in out.split()}


def test_import_linter_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports is not installed: `pip install -e '.[dev]'`")
    proc = subprocess.run([lint], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_the_worker_task_module_loads_no_web_framework():
    loaded = _loaded_after("import worker.tasks")
    assert not loaded & {"fastapi", "starlette", "uvicorn"}, loaded & {"fastapi", "starlette"}


def test_the_api_loads_no_torch():
    loaded = _loaded_after("import service.main; service.main.create_app()")
    assert not loaded & {"torch", "torchvision", "timm", "worker"}


def test_the_job_spec_is_torch_free():
    loaded = _loaded_after("import core.jobspec")
    assert not loaded & {"torch", "fastapi", "sqlalchemy", "celery"}


def test_no_module_is_over_the_line_limit():
    long = {
        str(path.relative_to(REPO)): n
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them): {long}"

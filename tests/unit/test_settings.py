import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from core.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def compose_env_names() -> set[str]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    names: set[str] = set()
    for name in ("api", "worker"):
        names |= set(compose["services"][name]["environment"])
    return names


def test_docker_compose_sets_only_variables_that_settings_reads():
    fields = {f.upper() for f in Settings.model_fields}
    names = compose_env_names()
    assert names, "docker-compose.yml sets no environment for api/worker"
    assert names <= fields, f"unknown to Settings: {sorted(names - fields)}"
    # And the ones production needs are all there.
    assert {
        "DATABASE_URL",
        "BROKER_URL",
        "STORAGE_BACKEND",
        "S3_ENDPOINT_URL",
        "S3_BUCKET",
    } <= names


def test_code_reads_the_environment_only_in_settings():
    offenders = []
    for path in list((REPO / "service").rglob("*.py")) + list((REPO / "worker").rglob("*.py")):
        if path.name == "settings.py":
            continue
        if re.search(r"os\.environ|os\.getenv", path.read_text()):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_bad_values_fail_fast_naming_the_variable():
    with pytest.raises(ValidationError, match="DATABASE_URL"):
        Settings(database_url="mysql://nope")
    with pytest.raises(ValidationError, match="LOG_LEVEL"):
        Settings(log_level="loud")
    with pytest.raises(ValidationError, match="max_upload_bytes"):
        Settings(max_upload_bytes=0)


def test_plain_postgres_urls_use_psycopg3():
    assert Settings(database_url="postgresql://u@h/db").database_url.startswith(
        "postgresql+psycopg://"
    )


def test_empty_settings_mean_the_embedded_default(tmp_path, monkeypatch):
    for name in ("DATABASE_URL", "BROKER_URL", "STORAGE_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    s = Settings(data_dir=tmp_path)
    assert s.embedded
    assert s.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'finetune.db'}"
    assert s.resolved_broker_url.startswith("sqla+sqlite:///")


def test_the_api_process_never_imports_torch_or_worker_code():
    code = (
        "import sys; import service.main; "
        "bad = [m for m in sys.modules "
        "if m == 'torch' or m.startswith(('torch.', 'worker', 'timm'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_settings_that_defeat_their_purpose_are_warned_about():
    assert Settings().warnings() == []  # the defaults are coherent
    short = Settings(broker_visibility_timeout_seconds=3600, job_max_duration_seconds=7200)
    (warning,) = short.warnings()
    assert "BROKER_VISIBILITY_TIMEOUT_SECONDS (3600)" in warning and "7500s" in warning
    jittery = Settings(heartbeat_seconds=10, stale_after_seconds=15)
    assert "STALE_AFTER_SECONDS" in jittery.warnings()[0]

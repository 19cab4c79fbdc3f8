import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from core.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """Each test sees only the variables it sets: the integration tier (run earlier in the
    same session) leaves its DATABASE_URL, S3 keys and queues in the environment."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


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


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("broker_url", "kafka://broker:9092", "BROKER_URL"),
        ("broker_url", "redis-host:6379", "BROKER_URL"),
        ("database_url", "sqlitefoo", "DATABASE_URL"),
        ("task_queue", "", "TASK_QUEUE"),
        ("light_queue", "previews,training", "LIGHT_QUEUE"),
        ("task_queue", "two words", "TASK_QUEUE"),
        ("storage_backend", "ftp", "storage_backend"),
        ("s3_bucket", "Not_A_Bucket", "S3_BUCKET"),
        ("s3_bucket", "", "S3_BUCKET"),
        ("s3_region", " ", "S3_REGION"),
        ("s3_endpoint_url", "minio:9000", "S3_ENDPOINT_URL"),
        ("s3_public_endpoint_url", "ftp://files.example", "S3_PUBLIC_ENDPOINT_URL"),
        ("import_allowed_prefixes", ["s3://"], "IMPORT_ALLOWED_PREFIXES"),
        ("import_allowed_prefixes", ["/srv/imports/"], "IMPORT_ALLOWED_PREFIXES"),
        ("cors_allow_origins", ["https://app.example/"], "CORS_ALLOW_ORIGINS"),
        ("cors_allow_origins", ["app.example"], "CORS_ALLOW_ORIGINS"),
        ("forwarded_allow_ips", "10.0.0.0/33", "FORWARDED_ALLOW_IPS"),
        ("forwarded_allow_ips", "proxy.internal", "FORWARDED_ALLOW_IPS"),
        ("worker_max_restarts", -1, "worker_max_restarts"),
        ("worker_restart_window_seconds", 0, "worker_restart_window_seconds"),
        ("stop_grace_seconds", 0, "stop_grace_seconds"),
        ("dataloader_workers", -2, "dataloader_workers"),
    ],
)
def test_every_operator_setting_is_checked_at_start_naming_it(field, value, named):
    with pytest.raises(ValidationError, match=named):
        Settings(**{field: value})


def test_settings_that_contradict_each_other_are_refused(monkeypatch):
    monkeypatch.setenv("TASK_QUEUE", "jobs")
    monkeypatch.setenv("LIGHT_QUEUE", "jobs")
    with pytest.raises(ValidationError, match="TASK_QUEUE and LIGHT_QUEUE"):
        Settings()
    monkeypatch.delenv("LIGHT_QUEUE")
    with pytest.raises(ValidationError, match="S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY"):
        Settings(s3_access_key_id="AKIA")


def test_good_values_pass_and_empty_urls_mean_unset():
    s = Settings(
        broker_url="sqla+sqlite:////tmp/broker.db",
        database_url="postgres://u@h/db",
        s3_endpoint_url="",
        s3_public_endpoint_url="https://files.example:9000",
        import_allowed_prefixes=["s3://imports/{tenant}/"],
        cors_allow_origins=["http://localhost:3000", "*"],
        forwarded_allow_ips=" 10.0.0.1, 10.1.0.0/16 ,::1",
    )
    assert s.s3_endpoint_url is None
    assert s.database_url == "postgresql+psycopg://u@h/db"
    assert s.forwarded_allow_ips == "10.0.0.1,10.1.0.0/16,::1"
    assert Settings(broker_url="redis://h:6379/0", task_queue="a.b-c").broker_url


def test_forwarded_headers_are_believed_only_from_declared_proxies():
    from cli.processes import proxy_options

    assert proxy_options(Settings()) == {"proxy_headers": False, "forwarded_allow_ips": ""}
    assert proxy_options(Settings(forwarded_allow_ips="10.0.0.2")) == {
        "proxy_headers": True,
        "forwarded_allow_ips": "10.0.0.2",
    }


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_the_cli_refuses_a_port_that_is_not_one(port, capsys):
    from cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", port])
    assert exited.value.code == 2 and "--port" in capsys.readouterr().err


# --- docker-compose.yml: the MinIO root stays with MinIO ----------------------------------

MINIO_ROOT = ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")
SECRET_NAME = re.compile(r"PASSWORD|SECRET")
# `${NAME:?message}`: required, no default that could be a secret written in the file.
REQUIRED_VARIABLE = re.compile(r"\$\{([A-Z0-9_]+):\?[^}]*\}")


def compose_services() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]


def service_env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_only_minio_and_its_init_get_the_minio_root_credentials():
    services = compose_services()
    root = service_env(services["minio"])
    assert set(MINIO_ROOT) <= set(root)
    for name, service in services.items():
        if name in ("minio", "minio-init"):
            continue
        env = service_env(service)
        assert not set(env) & set(MINIO_ROOT), name
        assert not any("MINIO_ROOT" in v or v in root.values() for v in env.values()), name
    for name in ("api", "worker", "light-worker"):
        env = service_env(services[name])
        assert env["S3_ACCESS_KEY_ID"] != root["MINIO_ROOT_USER"], name
        assert env["S3_SECRET_ACCESS_KEY"] != root["MINIO_ROOT_PASSWORD"], name


def test_compose_holds_no_literal_secret():
    in_urls = 0
    for name, service in compose_services().items():
        for key, value in service_env(service).items():
            if SECRET_NAME.search(key):
                assert REQUIRED_VARIABLE.fullmatch(value), f"{name}: {key} is a literal"
            # A password inside a URL (user:password@host) is a secret too.
            for password in re.findall(r"://[^/:@\s]+:(\$\{[^}]*\}|[^@\s]+)@", value):
                assert REQUIRED_VARIABLE.fullmatch(password), f"{name}: {key} holds one"
                in_urls += 1
    assert in_urls, "DATABASE_URL's password was not found"


def test_minio_publishes_no_console_and_the_service_user_is_made_for_its_bucket():
    services = compose_services()
    for name, service in services.items():
        published = [str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])]
        assert "9001" not in published, name
    (s3_port,) = services["minio"]["ports"]
    assert s3_port.endswith(":9000:9000") and s3_port.startswith("${MINIO_S3_BIND")
    init, api = service_env(services["minio-init"]), service_env(services["api"])
    assert init["BUCKET"] == api["S3_BUCKET"]
    assert init["SERVICE_ACCESS_KEY"] == api["S3_ACCESS_KEY_ID"]
    secret = REQUIRED_VARIABLE.fullmatch(api["S3_SECRET_ACCESS_KEY"])
    assert secret and REQUIRED_VARIABLE.fullmatch(init["SERVICE_SECRET_KEY"])
    assert secret.group(1) == REQUIRED_VARIABLE.fullmatch(init["SERVICE_SECRET_KEY"]).group(1)
    script = "\n".join(services["minio-init"]["command"])
    resources = re.findall(r'"arn:aws:s3:::([^"]*)"', script)
    assert resources and set(resources) == {"$$BUCKET", "$$BUCKET/*"}
    assert '"s3:*"' not in script and "consoleAdmin" not in script
    depends = services["api"]["depends_on"]
    assert depends["minio-init"] == {"condition": "service_completed_successfully"}

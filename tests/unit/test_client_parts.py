"""The Python client's parts that need no server: what it imports, the zip it streams, the
multipart body, the event-stream parser, its error type, its claim to cover the API, and
the CLI's config file."""

from __future__ import annotations

import email.parser
import io
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from client import ApiError, Client
from client.coverage import COVERED, OPTIONAL, excluded_because
from client.jobs import _event, parse_sse
from client.uploads import CHUNK, multipart, zip_stream

REPO = Path(__file__).resolve().parents[2]


def test_the_client_imports_httpx_and_pydantic_but_no_server_code_nor_torch():
    # (httpx itself loads rich when it is installed, for its own command line.)
    code = (
        "import sys, client, client.jobs, client.resources, client.uploads, client.coverage\n"
        "bad = {'torch', 'fastapi', 'starlette', 'sqlalchemy', 'celery', 'numpy', 'PIL',"
        " 'core', 'service', 'worker', 'cli', 'typer'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def make_folder(root: Path) -> dict[str, bytes]:
    files = {
        "cats/1.png": os.urandom(3 * CHUNK + 17),  # several chunks
        "cats/2.png": b"small",
        "dogs/sub/3.jpg": os.urandom(100),
        "empty.txt": b"",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / ".DS_Store").write_bytes(b"junk")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_bytes(b"ref")
    (root / "link.png").symlink_to(root / "cats" / "2.png")
    return files


def test_a_folder_streams_as_a_zip_holding_every_file_and_no_hidden_ones(tmp_path):
    files = make_folder(tmp_path)
    chunks = list(zip_stream(tmp_path))
    assert max(len(c) for c in chunks) <= CHUNK + 4096  # one chunk in memory, not the zip
    zf = zipfile.ZipFile(io.BytesIO(b"".join(chunks)))
    assert zf.testzip() is None
    assert {n: zf.read(n) for n in zf.namelist()} == files


def test_the_multipart_body_of_a_file_has_its_exact_length_and_parses(tmp_path):
    archive = tmp_path / "data.tar.gz"
    archive.write_bytes(os.urandom(CHUNK * 2 + 5))
    body = multipart(archive, {"name": 'my "set"'})
    data = b"".join(body.chunks)
    assert body.length == len(data) and body.expected == archive.stat().st_size
    parts = _parts(body.content_type, data)
    assert parts["name"] == (None, b'my "set"')
    assert parts["file"] == ("data.tar.gz", archive.read_bytes())


def test_the_multipart_body_of_a_folder_is_sent_chunked_as_a_zip(tmp_path):
    files = make_folder(tmp_path / "flowers")
    body = multipart(tmp_path / "flowers", {})
    assert body.length is None
    filename, payload = _parts(body.content_type, b"".join(body.chunks))["file"]
    assert filename == "flowers.zip"
    assert sorted(zipfile.ZipFile(io.BytesIO(payload)).namelist()) == sorted(files)


def test_an_empty_folder_or_a_missing_path_is_refused_before_sending(tmp_path):
    with pytest.raises(ValueError, match="no files"):
        multipart(tmp_path, {})
    with pytest.raises(FileNotFoundError, match="neither a folder nor a file"):
        multipart(tmp_path / "nope", {})


def _parts(content_type: str, data: bytes) -> dict[str, tuple[str | None, bytes]]:
    msg = email.parser.BytesParser().parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + data
    )
    return {
        p.get_param("name", header="content-disposition"): (
            p.get_filename(),
            p.get_payload(decode=True),
        )
        for p in msg.get_payload()
    }


def test_server_sent_events_are_parsed_with_their_type_and_json_data():
    lines = [
        ": keep-alive",
        "event: progress",
        'data: {"status": "running",',
        'data:  "step": 3}',
        "id: 7",
        "",
        "data: plain text",
        "",
    ]
    events = [_event(k, d) for k, d, _ in parse_sse(iter(lines))]
    assert [i for _, _, i in parse_sse(iter(lines))] == ["7", "7"]
    assert [(e.type, e.data) for e in events] == [
        ("progress", {"status": "running", "step": 3}),
        ("message", {"text": "plain text"}),
    ]


def test_an_event_carrying_the_job_gives_it_typed():
    job = {
        "id": "j1",
        "dataset_id": "d1",
        "status": "succeeded",
        "created_at": "2026-01-01T00:00:00Z",
    }
    event = _event("status", json.dumps({"job": job}))
    assert event.job is not None and event.job.terminal


def test_errors_carry_the_status_the_error_code_and_the_detail():
    body = {"error_code": "JOB_NOT_FOUND", "detail": "job x not found"}
    exc = ApiError.from_response(httpx.Response(404, json=body))
    assert (exc.status, exc.error_code, exc.detail, exc.is_client_error) == (
        404,
        "JOB_NOT_FOUND",
        "job x not found",
        True,
    )
    proxy = ApiError.from_response(httpx.Response(502, text="<html>Bad Gateway</html>"))
    assert proxy.error_code == "HTTP_502" and "Bad Gateway" in proxy.detail
    assert not proxy.is_client_error


def test_every_operation_of_the_schema_is_covered_or_excluded_with_a_reason():
    from service.main import create_app

    schema = create_app().openapi()
    operations = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    missing = sorted(op for op in operations if op not in COVERED and not excluded_because(*op))
    assert not missing, f"the client covers none of {missing}: add them or exclude them"
    stale = set(COVERED) - operations - OPTIONAL
    assert not stale, f"the client claims operations the API does not have: {stale}"
    client = Client("http://127.0.0.1:9", api_key="")
    for op, attr in COVERED.items():
        target: object = client
        for part in attr.split("."):
            target = getattr(target, part)
        assert callable(target), (op, attr)


def test_login_saves_the_key_readable_by_the_user_alone_and_the_environment_wins(
    tmp_path, monkeypatch
):
    from cli.user.config import config_path, resolve, save

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("FINETUNE_URL", raising=False)
    monkeypatch.delenv("FINETUNE_API_KEY", raising=False)
    path = save("http://svc:8000", "ft_secret")
    assert path == config_path() == tmp_path / "finetune" / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve() == ("http://svc:8000", "ft_secret")
    monkeypatch.setenv("FINETUNE_URL", "http://other:1")
    monkeypatch.setenv("FINETUNE_API_KEY", "ft_env")
    assert resolve() == ("http://other:1", "ft_env")
    assert resolve("http://flag:2", "ft_flag") == ("http://flag:2", "ft_flag")


def test_the_user_commands_answer_usage_errors_with_2_and_unreachable_with_4(monkeypatch):
    from cli.main import main

    monkeypatch.setenv("FINETUNE_URL", "http://127.0.0.1:9")
    assert main(["jobs", "submit"]) == 2  # --dataset is required
    assert main(["jobs", "download", "j", "--format", "pdf"]) == 2
    assert main(["datasets", "list", "--json"]) == 4


def test_a_closed_event_stream_is_resumed_after_the_last_event_id_until_the_end():
    """The server closes long streams (EVENTS_MAX_STREAM_SECONDS): the client reconnects
    with Last-Event-ID and reads on to `end`; wait() reads the job as events arrive."""
    job = {"id": "j", "dataset_id": "d", "created_at": "2026-01-01T00:00:00Z"}
    streams = [
        'retry: 1000\n\nid: 0\nevent: status\ndata: {"status": "running"}\n\n'
        'id: 4\nevent: metrics\ndata: {"epoch": 0, "val_accuracy": 0.5}\n\n',
        'id: 4\nevent: status\ndata: {"status": "succeeded"}\n\n'
        'id: 9\nevent: end\ndata: {"status": "succeeded"}\n\n',
    ]
    asked: list[str | None] = []
    statuses = iter(["queued", "succeeded"])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/openapi.json":
            return httpx.Response(200, json={"paths": {"/v1/jobs/{job_id}/events": {"get": {}}}})
        if request.url.path == "/v1/jobs/j/events":
            asked.append(request.headers.get("last-event-id"))
            body = streams[len(asked) - 1]
            return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={**job, "status": next(statuses)})

    http = httpx.Client(base_url="http://svc", transport=httpx.MockTransport(handler))
    api = Client(http=http, api_key="")
    events = list(api.jobs.events("j"))
    assert [e.type for e in events] == ["status", "metrics", "status", "end"]
    assert asked == [None, "4"]
    asked.clear()
    seen = []
    assert api.jobs.wait("j", callback=seen.append, poll_interval=0).status == "succeeded"
    # Read once (still queued then), kept current by the events, read again at the end.
    assert [j.status for j in seen] == ["running", "running", "succeeded"]
    assert seen[1].latest_metrics == {"epoch": 0, "val_accuracy": 0.5}

"""The dashboard in a real browser (Debian's chromium, driven by playwright): upload a
dataset through the file input, submit a small job, watch it succeed on a real worker,
check what the job page draws, and download the model; once on the PostgreSQL + S3 stack
with auth off, once on the zero-configuration service with a key. Screenshots land in
var/screenshots/ for a person to look at."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, free_port, wait_for
from tests.helpers import digits_samples, digits_zip, png_bytes

pytestmark = pytest.mark.e2e

SHOTS = REPO / "var" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SERVER_VARS = (
    "DATABASE_URL",
    "BROKER_URL",
    "STORAGE_BACKEND",
    "TASK_QUEUE",
    "LIGHT_QUEUE",
    "DATA_DIR",
    "AUTH_ENABLED",
)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api")
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make install` adds it as root"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """`finetune serve` as a user starts it with no configuration: SQLite, a local object
    store (the API streams downloads), worker children, and auth on with the admin key it
    prints once. (url, key)."""
    data_dir = tmp_path_factory.mktemp("embedded")
    env = {k: v for k, v in os.environ.items() if k not in SERVER_VARS and not k.startswith("S3_")}
    env.update(DATA_DIR=str(data_dir), AUTH_ENABLED="true", PYTHONUNBUFFERED="1")
    env.update(PROGRESS_INTERVAL_SECONDS="0.5")
    port = free_port()
    log_path = data_dir / "serve.log"
    cmd = [sys.executable, "-m", "cli", "serve", "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, 90, "embedded service ready")
    match = re.search(r"^\s+(ft_[0-9a-f]{16}_\S+)$", log_path.read_text(), re.MULTILINE)
    assert match, log_path.read_text()[-3000:]
    yield url, match.group(1)
    proc.terminate()
    try:
        proc.wait(45)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def open_page(browser, base_url: str):
    context = browser.new_context(
        base_url=base_url, accept_downloads=True, viewport={"width": 1200, "height": 900}
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: (
            errors.append(msg.text)
            if msg.type == "error" and "Failed to load resource" not in msg.text
            else None
        ),
    )
    # A script or stylesheet the page asks for and does not get.
    page.on(
        "response",
        lambda r: (
            errors.append(f"{r.status} {r.url}")
            if "/static/" in r.url and r.status >= 400
            else None
        ),
    )
    return context, page, errors


@pytest.fixture()
def page(browser, server_url):
    context, page, errors = open_page(browser, server_url)
    yield page
    context.close()
    assert not errors, errors  # no script error, no CSP violation


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_dashboard_is_served_offline_with_a_strict_content_security_policy(server_url):
    index = httpx.get(f"{server_url}/")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    csp = index.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'self'" in csp
    # Every script and stylesheet comes from this origin: nothing from a CDN.
    assets = re.findall(r'(?:src|href)="([^"#]+)"', index.text)
    assert assets and all(a.startswith("/static/") or a == "/docs" for a in assets), assets
    for path in ("/static/app.js", "/static/style.css", "/static/jobs.js"):
        resp = httpx.get(f"{server_url}{path}")
        assert resp.status_code == 200, path
        assert "http://" not in resp.text and "https://" not in resp.text.replace(
            "http://www.w3.org/2000/svg", ""
        )
    # The API behind it still wants its usual answers: /v1/ is untouched.
    assert httpx.get(f"{server_url}/v1/nothing-here").status_code == 404


def upload_and_train(page, archive: Path, name: str, shots: str) -> str:
    """From the datasets page: upload by the file input, read the report, submit a one-epoch
    job at 32 px by the form's labels, watch it to success. The job's id."""
    page.get_by_role("heading", name="Datasets", exact=True).wait_for()
    # Upload through the drop zone's file input (its label makes it keyboard-reachable).
    page.get_by_label("Name").fill(name)
    page.get_by_label("Archive to upload").set_input_files(str(archive))
    page.get_by_role("heading", name=name).wait_for(timeout=60_000)
    page.get_by_text("Images per class and split").wait_for()
    page.get_by_text("No image appears in more than one split.").wait_for()
    page.locator("img.sheet[src^='blob:']").wait_for(timeout=30_000)
    shot(page, f"{shots}-dataset")

    page.get_by_role("link", name="Train a model on this dataset").click()
    page.get_by_role("heading", name="New training job").wait_for()
    # Every control is reachable by its label; unavailable backbones are disabled.
    for label in ("Dataset", "Recipe", "Backbone", "Strategy", "Epochs", "Image size (px)"):
        assert page.get_by_label(label, exact=True).count() == 1, label
    assert page.locator("#backbone option:not([disabled])").count() >= 2
    page.get_by_label("Quick check").check()
    assert page.get_by_label("Epochs", exact=True).input_value() == "1"
    page.get_by_label("Image size (px)").fill("32")
    page.get_by_label("Backbone", exact=True).select_option("efficientnet_lite0")
    page.get_by_label("Time budget (seconds)").fill("")
    shot(page, f"{shots}-submit")
    page.get_by_role("button", name="Start training").click()

    page.get_by_role("heading", name=re.compile(r"^Job ")).wait_for()
    job_id = page.url.rsplit("/", 1)[-1]
    assert job_id.startswith("job_"), page.url
    page.locator(".badge.status-running, .badge.status-succeeded").wait_for(timeout=120_000)
    shot(page, f"{shots}-job-running")
    page.locator(".badge.status-succeeded").wait_for(timeout=240_000)
    assert page.locator("progress").first.get_attribute("value") == "1"
    return job_id


def download_zip(page, saved: Path) -> list[str]:
    with page.expect_download(timeout=60_000) as info:
        page.get_by_role("button", name="Download Model bundle (.zip)").click()
    info.value.save_as(saved)
    names = zipfile.ZipFile(io.BytesIO(saved.read_bytes())).namelist()
    assert any(n.endswith("model.safetensors") for n in names), names
    assert any(n.endswith("metadata.json") for n in names), names
    return names


def test_upload_submit_watch_and_download_in_chromium(page, server_url, worker_process, tmp_path):
    """PostgreSQL, S3 (downloads are presigned URLs the page opens) and auth off."""
    train, _ = digits_samples(limit=300)
    archive = tmp_path / "digits.zip"
    archive.write_bytes(digits_zip(train))

    page.goto("/")
    # Auth is off in this stack: the dashboard says so and shows the datasets page.
    page.get_by_text("Authentication is off on this server").wait_for()
    job_id = upload_and_train(page, archive, "digits from the browser", "1")

    page.get_by_role("heading", name="Confusion matrix").wait_for(timeout=30_000)
    # The curves are drawn (one point at least per epoch), the matrix has one row a class.
    assert page.locator("figure.chart svg circle").count() >= 2
    assert page.locator("table.confusion tbody tr").count() == 10
    assert page.get_by_role("heading", name="Per class").count() == 1
    page.get_by_role("heading", name="Label issues").wait_for()
    shot(page, "1-job-succeeded")
    download_zip(page, tmp_path / "model.zip")

    # Try the model: predictions in the API (onnxruntime), Grad-CAM from the worker.
    digit = tmp_path / "digit.png"
    digit.write_bytes(png_bytes(train[0][0]))
    page.get_by_label("Images to classify").set_input_files(str(digit))
    page.get_by_text("Predictions", exact=True).wait_for(timeout=60_000)
    page.get_by_role("button", name="Explain digit.png (Grad-CAM)").click()
    page.locator("img.overlay[src^='blob:']").wait_for(timeout=120_000)
    page.get_by_role("heading", name="Try this model").scroll_into_view_if_needed()
    shot(page, "1-try-model")

    # The model is in the registry.
    page.get_by_role("link", name="Models").click()
    page.get_by_role("heading", name="Registry").wait_for()
    assert page.get_by_role("link", name=job_id).count() == 1
    shot(page, "1-models")


def test_embedded_service_signs_in_with_a_key_and_streams_the_download(
    browser, embedded_server, tmp_path
):
    """The zero-configuration service: auth on, local storage (the page fetches the file
    with the key and saves it). The key stays in session storage, never in a URL."""
    url, key = embedded_server
    train, _ = digits_samples(limit=200)
    archive = tmp_path / "digits.zip"
    archive.write_bytes(digits_zip(train))
    context, page, errors = open_page(browser, url)
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto("/")
    page.get_by_role("heading", name="Sign in").wait_for()
    assert page.locator("#nav").is_hidden()
    # Keyboard only: the key's field has the focus, Tab reaches the button, Enter submits.
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.keyboard.type("ft_not-a-real-key")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Sign in"
    page.keyboard.press("Enter")
    page.get_by_role("alert").filter(has_text="Sign-in refused").wait_for()
    shot(page, "2-sign-in-refused")
    page.get_by_label("API key").fill(key)
    page.get_by_label("API key").press("Enter")
    page.get_by_text("Tenant default").wait_for()
    assert page.evaluate("sessionStorage.getItem('finetune.apiKey')") == key
    assert page.evaluate("localStorage.length") == 0 and key not in page.evaluate("document.cookie")
    page.reload()  # the tab keeps its session
    job_id = upload_and_train(page, archive, "digits signed in", "2")
    download_zip(page, tmp_path / "model.zip")
    shot(page, "2-job-succeeded")

    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="Sign in").wait_for()
    assert page.evaluate("sessionStorage.length") == 0
    page.goto(f"/#/jobs/{job_id}")  # signed out, a job's address shows the sign-in only
    page.get_by_role("heading", name="Sign in").wait_for()
    assert page.get_by_text(job_id).count() == 0
    assert requested and not [u for u in requested if key in u]
    context.close()
    assert not errors, errors

"""Which API operations the client covers, and which it leaves out on purpose.

`tests/integration/test_client.py` checks this against the server's OpenAPI schema: an
operation in the schema that is neither covered nor excluded (with a reason) fails it, and
so does a covered method the client does not have."""

from __future__ import annotations

# (METHOD, path template) -> the client method, as an attribute path from `Client`.
COVERED: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): "healthz",
    ("GET", "/readyz"): "readyz",
    ("GET", "/v1/me"): "me",
    ("GET", "/v1/backbones"): "backbones",
    ("POST", "/v1/datasets"): "datasets.upload",
    ("POST", "/v1/datasets/import"): "datasets.import_",
    ("GET", "/v1/datasets"): "datasets.list",
    ("GET", "/v1/datasets/{dataset_id}"): "datasets.get",
    ("DELETE", "/v1/datasets/{dataset_id}"): "datasets.delete",
    ("GET", "/v1/datasets/{dataset_id}/samples.png"): "datasets.samples_png",
    ("GET", "/v1/datasets/{dataset_id}/augmentations/preview"): "datasets.augmentation_preview",
    ("POST", "/v1/jobs"): "jobs.submit",
    ("GET", "/v1/jobs"): "jobs.list",
    ("GET", "/v1/jobs/{job_id}"): "jobs.get",
    ("POST", "/v1/jobs/{job_id}/cancel"): "jobs.cancel",
    ("GET", "/v1/jobs/{job_id}/events"): "jobs.events",
    ("GET", "/v1/jobs/{job_id}/metrics"): "jobs.metrics",
    ("GET", "/v1/jobs/{job_id}/report"): "jobs.report",
    ("GET", "/v1/jobs/{job_id}/plots/{name}.png"): "jobs.plot",
    ("GET", "/v1/jobs/{job_id}/model"): "jobs.download",
    ("POST", "/v1/jobs/{job_id}/predict"): "jobs.predict",
    ("POST", "/v1/jobs/{job_id}/explain"): "jobs.explain",
    ("GET", "/v1/jobs/{job_id}/explanations/{explanation_id}"): "jobs.explanation",
    ("GET", "/v1/jobs/{job_id}/explanations/{explanation_id}.png"): "jobs.explanation_image",
    ("GET", "/v1/jobs/{job_id}/label-issues"): "jobs.label_issues",
    ("GET", "/v1/models"): "models.list",
    ("GET", "/v1/models/{ref}"): "models.get",
    ("PATCH", "/v1/models/{ref}"): "models.update",
    ("GET", "/v1/models/{ref}/download"): "models.download",
    ("POST", "/v1/models/{ref}/predict"): "models.predict",
    ("POST", "/v1/models/{ref}/explain"): "models.explain",
    ("POST", "/v1/webhooks"): "webhooks.create",
    ("GET", "/v1/webhooks"): "webhooks.list",
    ("GET", "/v1/webhooks/{webhook_id}"): "webhooks.get",
    ("DELETE", "/v1/webhooks/{webhook_id}"): "webhooks.delete",
    ("GET", "/v1/webhooks/{webhook_id}/deliveries"): "webhooks.deliveries",
    ("GET", "/v1/jobs/{job_id}/webhook-deliveries"): "webhooks.job_deliveries",
    ("POST", "/v1/webhook-deliveries/{delivery_id}/redeliver"): "webhooks.redeliver",
}

# Covered, and used only where the server has them: the client falls back where it has not
# (an older server), so the test does not require them in the schema.
OPTIONAL: frozenset[tuple[str, str]] = frozenset({("GET", "/v1/jobs/{job_id}/events")})

_OPERATOR = "operator API: tenants, keys and audit are `finetune tenants|keys` on the host"
# Path prefixes left out, with why.
EXCLUDED_PREFIXES: dict[str, str] = {
    "/v1/admin/": _OPERATOR,
}
# Single operations left out, with why.
EXCLUDED: dict[tuple[str, str], str] = {
    ("GET", "/v1/jobs/{job_id}/model/link"): "for browsers, which cannot read the Location "
    "of a 307; the client follows the redirect of /model itself (jobs.download)",
}


def excluded_because(method: str, path: str) -> str | None:
    """Why an operation is left out, or None when it is not."""
    if (method, path) in EXCLUDED:
        return EXCLUDED[(method, path)]
    return next((why for prefix, why in EXCLUDED_PREFIXES.items() if path.startswith(prefix)), None)

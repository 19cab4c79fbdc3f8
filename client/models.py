"""Typed results: the API's response bodies as the client sees them.

Every model allows extra fields, so a newer server that adds one does not break an older
client; the fields named here are the ones the client and the CLI read."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

TERMINAL = frozenset({"succeeded", "failed", "canceled"})


class Wire(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class ClassCount(Wire):
    name: str
    count: int


class FileIssue(Wire):
    path: str
    reason: str


class Dataset(Wire):
    id: str
    name: str
    created_at: datetime
    size_bytes: int
    sha256: str
    format: str = "zip"
    layout: str = "imagefolder"
    task: str = "single-label"
    num_images: int
    num_classes: int
    classes: list[ClassCount] = []
    splits: dict[str, dict[str, int]] = {}
    imbalance_ratio: float | None = None
    label_cardinality: float | None = None
    image_sizes: dict[str, Any] | None = None
    duplicates: dict[str, Any] | None = None
    leakage: dict[str, Any] | None = None
    conflicting_labels: dict[str, Any] | None = None
    rejected: list[FileIssue] = []
    skipped: list[FileIssue] = []
    num_rejected: int = 0
    num_skipped: int = 0


class Progress(Wire):
    phase: str | None = None
    epoch: int = 0
    total_epochs: int = 0
    step: int = 0
    total_steps: int = 0
    fraction: float = 0.0
    eta_seconds: float | None = None
    updated_at: datetime | None = None


class JobError(Wire):
    code: str
    message: str = ""


class Job(Wire):
    id: str
    dataset_id: str
    status: str
    config: dict[str, Any] = {}
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    cancel_requested: bool = False
    progress: Progress = Field(default_factory=Progress)
    latest_metrics: dict[str, Any] | None = None
    best_metrics: dict[str, Any] | None = None
    error: JobError | None = None
    model_available: bool = False
    warnings: list[str] = []

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class Metric(Wire):
    epoch: int
    phase: str | None = None
    train_loss: float | None = None
    train_accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_macro_f1: float | None = None
    learning_rate: float | None = None
    epoch_seconds: float | None = None


class JobReport(Wire):
    job_id: str
    status: str
    backbone: str
    classes: list[str]
    best_epoch: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    training: dict[str, Any] = {}
    warnings: list[str] = []


class LabelScore(Wire):
    label: str
    probability: float


class ImagePrediction(Wire):
    filename: str
    top: list[LabelScore]
    labels: list[str] | None = None
    scores: dict[str, float] | None = None
    thresholds: dict[str, float] | None = None


class Predictions(Wire):
    job_id: str
    task: str
    backbone: str
    input_size: int
    data: list[ImagePrediction]
    count: int


class Explanation(Wire):
    """Poll while `status` is "pending"; once "done", the overlay is at `image_url`."""

    id: str
    job_id: str
    status: str
    target: str | None = None
    prediction: dict[str, Any] | None = None
    error: str | None = None


class LabelIssues(Wire):
    data: list[dict[str, Any]] = []
    count: int = 0
    images: int = 0
    per_class: dict[str, int] = {}


class Model(Wire):
    id: str
    name: str
    version: int
    tags: list[str] = []
    stage: str = "none"
    job_id: str
    backbone: str | None = None
    metrics: dict[str, Any] | None = None
    dataset_id: str
    dataset_sha256: str | None = None
    created_at: datetime
    updated_at: datetime


class Backbone(Wire):
    name: str
    library: str
    params_millions: float
    default_input_size: int
    imagenet_top1: float | None = None
    weights_available: bool = False


class Me(Wire):
    tenant_id: str
    tenant_name: str
    key_id: str | None = None
    scopes: list[str] = []
    auth_enabled: bool = False
    limits: dict[str, Any] = {}
    usage: dict[str, Any] = {}


class Page(Wire):
    """A list envelope: `data` (one page) and `count` (all that match)."""

    count: int


class Datasets(Page):
    data: list[Dataset]


class Jobs(Page):
    data: list[Job]
    next_cursor: str | None = None  # pass as `after` for the next page


class Metrics(Page):
    data: list[Metric]


class Models(Page):
    data: list[Model]


class Backbones(Page):
    data: list[Backbone]


class JobEvent(Wire):
    """One event about a job: from the server's event stream, or made up by the client from
    a poll of the job (`type` "job", with the job in `job`) where the server has no stream."""

    type: str
    data: dict[str, Any] = {}
    job: Job | None = None

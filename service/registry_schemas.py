"""The model registry's bodies (`service/schemas.py`'s conventions, in a module of their own
to keep that one under the line limit): `ModelPublic`, `ModelsPublic`, `ModelUpdate`."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from core import registry
from core.db import as_utc
from core.models import Job, RegisteredModel

Stage = Literal["none", "staging", "production", "archived"]


def _accepting(pattern: str, what: str, rule: str) -> Any:
    """A check whose error says what is accepted (pydantic's own `pattern` check answers with
    the regular expression); the pattern itself goes into the OpenAPI schema beside it."""

    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(f"{value[:100]!r} is not {what}: {rule}")
        return value

    return AfterValidator(check)


NAME = f"^{registry.NAME_BODY}$"
NAME_RULE = f"a name is {registry.NAME_RULE}"
TAG = f"^{registry.TAG_RE.pattern}$"
ModelName = Annotated[
    str,
    Field(json_schema_extra={"pattern": NAME}, description=NAME_RULE),
    _accepting(NAME, "a model name", NAME_RULE),
]
Tag = Annotated[
    str,
    Field(json_schema_extra={"pattern": TAG}, description=registry.TAG_RULE),
    _accepting(TAG, "a tag", registry.TAG_RULE),
]
ModelRef = Annotated[
    str,
    Field(json_schema_extra={"pattern": registry.REF_PATTERN}, description=registry.REF_RULE),
    _accepting(registry.REF_PATTERN, "a model reference", registry.REF_RULE),
]


class ModelPublic(BaseModel):
    id: str
    name: str
    version: int
    tags: list[str]
    stage: Stage
    job_id: str
    backbone: str | None
    metrics: dict[str, Any] | None = Field(description="the job's best epoch")
    dataset_id: str
    dataset_sha256: str | None = Field(description="content hash of the data it was trained on")
    created_at: datetime
    updated_at: datetime


def model_public(model: RegisteredModel, job: Job) -> ModelPublic:
    return ModelPublic(
        id=model.id,
        name=model.name,
        version=model.version,
        tags=list(model.tags or []),
        stage=model.stage,  # type: ignore[arg-type]
        job_id=job.id,
        backbone=job.config.get("backbone"),
        metrics=job.best_metrics,
        dataset_id=job.dataset_id,
        dataset_sha256=job.config.get("dataset_sha256"),
        created_at=as_utc(model.created_at),  # type: ignore[arg-type]
        updated_at=as_utc(model.updated_at),  # type: ignore[arg-type]
    )


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class ModelUpdate(BaseModel):
    """What PATCH changes; a field left out stays as it is."""

    model_config = ConfigDict(extra="forbid")

    name: ModelName | None = Field(
        None, description="a new name: the model becomes that name's next version"
    )
    tags: list[Tag] | None = Field(
        None, max_length=registry.MAX_TAGS, description="replaces the tags (duplicates are dropped)"
    )
    stage: Stage | None = Field(
        None,
        description="`production` archives the name's production model before it; "
        "`name@staging` and `name@production` resolve to the newest model in that stage",
    )

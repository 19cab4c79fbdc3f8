"""The model registry: the model of every succeeded job under a name and a version, with tags
and a stage, and the references that name one (`mdl_…`, `name`, `name@3`, `name@production`).

A model is registered inside its job's success transaction (`transitions.succeed`), so a
succeeded job always has its row. Versions count per (tenant, name): the next one is read and
written under the tenant's row lock, so two jobs of a tenant that succeed at once get 1 and 2,
never the same number (the unique constraint would refuse that anyway). Renames and stage
changes take the same lock. Promoting a model to `production` archives the name's production
model before it (like MLflow's `archive_existing_versions`): `name@production` is one model.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Text, cast, func, select, update
from sqlalchemy.orm import Session

from core.datasets import locked
from core.db import utcnow
from core.errors import ErrorCode, ServiceError
from core.models import Dataset, Job, ModelStage, RegisteredModel, Tenant, new_id
from core.tenancy import Principal, audit

NAME_BODY = r"[a-z0-9][a-z0-9._-]{0,63}"
NAME_RE = re.compile(NAME_BODY)
NAME_RULE = "1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
TAG_RE = re.compile(r"[a-z0-9][a-z0-9._:=-]{0,49}")
TAG_RULE = "1-50 characters of a-z, 0-9, '.', '_', ':', '=', '-', starting with a letter or digit"
MAX_TAGS = 20
ALIASES = (ModelStage.STAGING.value, ModelStage.PRODUCTION.value)  # what `name@<stage>` takes
STAGES = tuple(s.value for s in ModelStage)
# Every reference the API resolves; the routes put it in their OpenAPI path parameter.
REF_PATTERN = rf"^{NAME_BODY}(@([1-9][0-9]{{0,8}}|{'|'.join(ALIASES)}))?$"
REF_RULE = (
    "a model id (mdl_...), `name` (its newest version), `name@<version>` (1, 2, ...) or "
    f"`name@staging`/`name@production`; a name is {NAME_RULE}"
)
# Lists: a name's versions together, the newest first.
ORDER = (RegisteredModel.name, RegisteredModel.version.desc())


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a name (or a model id) and at most one of version and stage."""

    name: str
    version: int | None = None
    stage: str | None = None


def parse_ref(ref: str) -> Ref:
    """`name`, `name@3`, `name@staging`, `name@production` (a bare name may be a model id)."""
    if not re.fullmatch(REF_PATTERN, ref):
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR, f"model reference {ref[:100]!r} is not {REF_RULE}"
        )
    name, _, alias = ref.partition("@")
    if not alias:
        return Ref(name)
    if alias.isdigit():
        return Ref(name, version=int(alias))
    return Ref(name, stage=alias)


def default_name(dataset_name: str) -> str:
    """A registry name from a dataset's free-text name: `My Pets (2024)` -> `my-pets-2024`."""
    ascii_name = unicodedata.normalize("NFKD", dataset_name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9._-]+", "-", ascii_name.lower()).strip("._-")
    return slug[:64].rstrip("._-") or "model"


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR, f"model name {name[:100]!r} must be {NAME_RULE}"
        )
    return name


def check_tags(tags: list[str]) -> list[str]:
    """The tags, each checked, duplicates dropped (first kept), in their order."""
    bad = [t for t in tags if not TAG_RE.fullmatch(t)]
    if bad:
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR, f"tag {bad[0][:100]!r} is not valid: a tag is {TAG_RULE}"
        )
    unique = list(dict.fromkeys(tags))
    if len(unique) > MAX_TAGS:
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR,
            f"{len(unique)} tags given; a model has at most {MAX_TAGS}",
        )
    return unique


def _next_version(session: Session, tenant_id: str, name: str) -> int:
    newest = session.scalar(
        select(func.max(RegisteredModel.version)).where(
            RegisteredModel.tenant_id == tenant_id, RegisteredModel.name == name
        )
    )
    return int(newest or 0) + 1


def register(session: Session, job_id: str) -> RegisteredModel:
    """Register the model of `job_id`, which has just succeeded, in the caller's transaction:
    named after its dataset, as that name's next version. The caller commits."""
    tenant_id, dataset_id = session.execute(
        select(Job.tenant_id, Job.dataset_id).where(Job.id == job_id)
    ).one()
    dataset_name = session.scalar(select(Dataset.name).where(Dataset.id == dataset_id))
    name = default_name(dataset_name or dataset_id)
    # The tenant's row, held until the caller's commit. (SQLite ignores FOR UPDATE: there the
    # job's UPDATE before this already holds the database's one write lock.)
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))
    model = RegisteredModel(
        id=new_id("mdl"),
        tenant_id=tenant_id,
        job_id=job_id,
        name=name,
        version=_next_version(session, tenant_id, name),
        tags=[],
        stage=ModelStage.NONE.value,
    )
    session.add(model)
    session.flush()
    return model


def get_model(session: Session, principal: Principal, ref: str) -> RegisteredModel:
    """The caller's model that `ref` names; another tenant's answers like a missing one."""
    parsed = parse_ref(ref)
    mine = select(RegisteredModel).where(RegisteredModel.tenant_id == principal.tenant_id)
    model = None
    if parsed.version is None and parsed.stage is None:
        model = session.scalar(mine.where(RegisteredModel.id == parsed.name))
    if model is None:
        query = mine.where(RegisteredModel.name == parsed.name)
        if parsed.version is not None:
            query = query.where(RegisteredModel.version == parsed.version)
        if parsed.stage is not None:
            query = query.where(RegisteredModel.stage == parsed.stage)
        model = session.scalar(query.order_by(RegisteredModel.version.desc()).limit(1))
    if model is None:
        raise ServiceError(
            ErrorCode.MODEL_NOT_FOUND,
            f"model {ref!r} not found; list your models with GET /v1/models",
        )
    return model


def model_job(session: Session, model: RegisteredModel) -> Job:
    """The job a model came from: its files, config (backbone, dataset hash) and metrics."""
    job = session.get(Job, model.job_id)
    assert job is not None, "models.job_id is a foreign key"
    return job


def resolve(session: Session, principal: Principal, ref: str) -> Job:
    """The job whose model `ref` names: what the download, predict and explain routes serve.
    MODEL_NOT_FOUND (404) for an unknown model and for another tenant's alike."""
    return model_job(session, get_model(session, principal, ref))


def filters(
    principal: Principal, name: str | None, stage: str | None, tag: str | None
) -> list[Any]:
    """The WHERE conditions of a listing of the caller's models."""
    where: list[Any] = [RegisteredModel.tenant_id == principal.tenant_id]
    if name is not None:
        where.append(RegisteredModel.name == name)
    if stage is not None:
        where.append(RegisteredModel.stage == stage)
    if tag is not None:
        # The tags are stored as JSON text (["a", "b:c"]). A tag holds no quote or backslash
        # (TAG_RE), so `"tag"` occurs in that text exactly when it is one of them: one portable
        # test for PostgreSQL's json and SQLite alike.
        where.append(cast(RegisteredModel.tags, Text).contains(f'"{tag}"', autoescape=True))
    return where


def with_jobs(
    session: Session, models: Sequence[RegisteredModel]
) -> list[tuple[RegisteredModel, Job]]:
    """Each model with its job (backbone, metrics, dataset), in one query."""
    ids = [m.job_id for m in models]
    jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids))).all()}
    return [(m, jobs[m.job_id]) for m in models]


def update_model(
    session: Session,
    principal: Principal,
    ref: str,
    *,
    name: str | None = None,
    tags: list[str] | None = None,
    stage: str | None = None,
    client: str | None = None,
) -> RegisteredModel:
    """Rename (the model becomes the new name's next version), retag (the list replaces the
    old one) or restage the caller's model, audited. A model that is `production` after the
    change archives the production model its name had."""
    if name is not None:
        check_name(name)
    if tags is not None:
        tags = check_tags(tags)
    if stage is not None and stage not in STAGES:
        raise ServiceError(
            ErrorCode.VALIDATION_ERROR, f"stage {stage!r} is not one of {', '.join(STAGES)}"
        )
    model = get_model(session, principal, ref)
    with locked(session, Tenant, principal.tenant_id):
        session.refresh(model)  # as it is now, under the lock
        new_name = name if name is not None else model.name
        new_stage = stage if stage is not None else model.stage
        changes: dict[str, Any] = {}
        version = model.version
        if new_name != model.name:
            version = _next_version(session, principal.tenant_id, new_name)
            changes.update(name=[model.name, new_name], version=[model.version, version])
        if new_stage != model.stage:
            changes["stage"] = [model.stage, new_stage]
        if tags is not None and tags != model.tags:
            changes["tags"] = [model.tags, tags]
        if new_stage == ModelStage.PRODUCTION.value and changes:
            # Before this model's row is written: the partial unique index allows one.
            archived = _archive_production(session, principal.tenant_id, new_name, model.id)
            if archived:
                changes["archived"] = archived
        if changes:
            model.name, model.version, model.stage = new_name, version, new_stage
            if tags is not None:
                model.tags = tags
            model.updated_at = utcnow()
            audit(session, principal, "model.update", "model", model.id, client, changes)
        session.commit()
    return model


def _archive_production(session: Session, tenant_id: str, name: str, keep: str) -> list[str]:
    """Archive the production model(s) of `name` other than `keep`; their ids."""
    current = (
        RegisteredModel.tenant_id == tenant_id,
        RegisteredModel.name == name,
        RegisteredModel.stage == ModelStage.PRODUCTION.value,
        RegisteredModel.id != keep,
    )
    ids = list(session.scalars(select(RegisteredModel.id).where(*current)).all())
    if ids:
        session.execute(
            update(RegisteredModel)
            .where(RegisteredModel.id.in_(ids))
            .values(stage=ModelStage.ARCHIVED.value, updated_at=utcnow())
            .execution_options(synchronize_session="fetch")
        )
    return ids

"""A finished job's label issues: the training images whose given label confident learning
(cleanlab) doubts, most suspect first. The rules live in `core/label_issues.py`; the sheet
of thumbnails is the plot `label_issues` (`GET /v1/jobs/{id}/plots/label_issues.png`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from core.label_issues import job_label_issues
from service.deps import Offset, PathId, ReadDep, SessionDep, StoreDep
from service.errors import ERROR_RESPONSES

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)

Label = str | list[str]  # a class name; a multi-label image's list of them


class LabelIssuePublic(BaseModel):
    index: int = Field(description="the image's position in the dataset's index")
    path: str = Field(description="the image's path in the uploaded archive")
    given_label: Label
    suggested_label: Label = Field(description="what a probe that never saw it predicts")
    score: float = Field(description="label quality, 0 to 1: lower is more likely mislabelled")


class LabelIssuesPublic(BaseModel):
    data: list[LabelIssuePublic]
    count: int = Field(description="flagged images in all (this page holds at most `limit`)")
    images: int = Field(description="training images checked")
    per_class: dict[str, int] = Field(description="flagged images per given class")
    method: str


@router.get("/{job_id}/label-issues", response_model=LabelIssuesPublic)
def read_label_issues(
    job_id: PathId,
    principal: ReadDep,
    session: SessionDep,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> LabelIssuesPublic:
    """The job's suspect training labels, most suspect first: found when the job succeeds,
    from out-of-sample probabilities of a cross-validated linear probe on the training
    images' features. 409 LABEL_ISSUES_NOT_AVAILABLE (saying why) when there are none."""
    doc = job_label_issues(session, principal=principal, store=store, job_id=job_id)
    issues = doc["issues"]
    return LabelIssuesPublic(
        data=[LabelIssuePublic.model_validate(i) for i in issues[offset : offset + limit]],
        count=len(issues),
        images=int(doc.get("images", 0)),
        per_class=doc.get("per_class", {}),
        method=doc.get("method", ""),
    )

from __future__ import annotations

from fastapi import APIRouter

from core import fleet
from core.backbones import BACKBONES
from core.weights import weights_on_host
from service.deps import ReadDep, SessionDep, SettingsDep
from service.errors import ERROR_RESPONSES
from service.schemas import BackbonePublic, BackbonesPublic

router = APIRouter(prefix="/v1/backbones", tags=["backbones"], responses=ERROR_RESPONSES)


@router.get("", response_model=BackbonesPublic)
def list_backbones(_: ReadDep, session: SessionDep, settings: SettingsDep) -> BackbonesPublic:
    """Every registered backbone, and whether a live worker can load its ImageNet weights
    now (with no worker on record: this host); `weights_source` is this host's."""
    on_workers = fleet.usable_backbones(session, settings)
    data = []
    for spec in BACKBONES.values():
        location = weights_on_host(spec, settings)
        here = location is not None or settings.allow_weight_downloads
        data.append(
            BackbonePublic(
                name=spec.name,
                library=spec.library,
                architecture=spec.arch,
                params_millions=spec.params_m,
                default_input_size=spec.input_size,
                imagenet_top1=spec.imagenet_top1,
                mean=list(spec.mean),
                std=list(spec.std),
                interpolation=spec.interpolation,
                crop_pct=spec.crop_pct,
                weights_available=here if on_workers is None else spec.name in on_workers,
                weights_source=location.kind
                if location
                else ("download" if settings.allow_weight_downloads else None),
            )
        )
    return BackbonesPublic(data=data, count=len(data))

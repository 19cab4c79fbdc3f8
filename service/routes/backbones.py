from __future__ import annotations

from fastapi import APIRouter

from service.backbones import BACKBONES
from service.schemas import BackbonePublic, BackbonesPublic

router = APIRouter(prefix="/v1/backbones", tags=["backbones"])


@router.get("", response_model=BackbonesPublic)
def list_backbones() -> BackbonesPublic:
    data = [
        BackbonePublic(
            name=s.name,
            library=s.library,
            params_millions=s.params_m,
            default_input_size=s.input_size,
            imagenet_top1=s.imagenet_top1,
            offline_weights=s.weights_package_installed(),
        )
        for s in BACKBONES.values()
    ]
    return BackbonesPublic(data=data, count=len(data))

from __future__ import annotations

from fastapi import APIRouter

from core.backbones import BACKBONES, BackboneSpec, WeightsLocation, locate_weights
from core.settings import Settings
from service.deps import ReadDep, SettingsDep
from service.errors import ERROR_RESPONSES
from service.schemas import BackbonePublic, BackbonesPublic

router = APIRouter(prefix="/v1/backbones", tags=["backbones"], responses=ERROR_RESPONSES)


def weights_on_host(spec: BackboneSpec, settings: Settings) -> WeightsLocation | None:
    return locate_weights(
        spec, settings.weights_dir, settings.resolved_torch_hub_dir, settings.resolved_hf_cache
    )


def usable_backbones(settings: Settings) -> list[str]:
    """Backbones a job may use now: weights on this host, or downloads allowed."""
    if settings.allow_weight_downloads:
        return sorted(BACKBONES)
    return sorted(n for n, s in BACKBONES.items() if weights_on_host(s, settings) is not None)


@router.get("", response_model=BackbonesPublic)
def list_backbones(_: ReadDep, settings: SettingsDep) -> BackbonesPublic:
    """Every registered backbone, and whether its ImageNet weights are on this host now."""
    data = []
    for spec in BACKBONES.values():
        location = weights_on_host(spec, settings)
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
                weights_available=location is not None or settings.allow_weight_downloads,
                weights_source=location.kind
                if location
                else ("download" if settings.allow_weight_downloads else None),
            )
        )
    return BackbonesPublic(data=data, count=len(data))

"""Which backbones this host can train now: the submit check and `GET /v1/backbones` ask
the same question, so that a backbone listed as usable is never refused at submit."""

from __future__ import annotations

from core.backbones import BACKBONES, BackboneSpec, WeightsLocation, locate_weights
from core.settings import Settings, weights_paths


def weights_on_host(spec: BackboneSpec, settings: Settings) -> WeightsLocation | None:
    return locate_weights(spec, *weights_paths(settings))


def usable_backbones(settings: Settings) -> list[str]:
    """Backbones a job may use now: weights on this host, or downloads allowed."""
    if settings.allow_weight_downloads:
        return sorted(BACKBONES)
    return sorted(n for n, s in BACKBONES.items() if weights_on_host(s, settings) is not None)

"""`finetune weights`: where each backbone's ImageNet weights are, or pull them for
air-gapped use."""

from __future__ import annotations

import argparse

from core.settings import get_settings


def cmd_weights(args: argparse.Namespace) -> int:
    from core.backbones import BACKBONES, locate_weights

    settings = get_settings()
    names = sorted(BACKBONES) if args.all or args.action == "list" else args.names
    unknown = [n for n in names if n not in BACKBONES]
    if unknown:
        print(f"unknown backbone(s) {unknown}; available: {', '.join(sorted(BACKBONES))}")
        return 2
    if args.action == "list":
        for name in names:
            where = locate_weights(
                BACKBONES[name],
                settings.weights_dir,
                settings.resolved_torch_hub_dir,
                settings.resolved_hf_cache,
            )
            print(f"{name:24s} {f'{where.kind}: {where.path}' if where else 'not on this host'}")
        return 0
    if not names:
        print("name at least one backbone, or --all")
        return 2
    from core.settings import weights_paths
    from worker.training.weights import pull

    failed = 0
    for name in names:
        try:
            print(f"{name}: {pull(BACKBONES[name], *weights_paths(settings))}")
        except Exception as exc:  # noqa: BLE001 - report each backbone, go on with the rest
            failed += 1
            print(f"{name}: FAILED: {exc}")
    return 1 if failed else 0

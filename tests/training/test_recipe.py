"""The auto recipe: it measures the data and the CPU, chooses within the budget, keeps
what the user pinned, and the job it plans honours its budget end to end."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks.proxies import build_pairs
from core.jobspec import JobSpec, pinned_fields
from tests.helpers import ingest_bytes, make_zip, png_bytes
from worker.training import measure, recipe
from worker.training.augment import train_transform
from worker.training.candidates import TOLERANCE
from worker.training.data import prepare
from worker.training.fit import fit

CPU = torch.device("cpu")


def planned(index_fixture, **fields):
    archive, index, _ = index_fixture
    spec = JobSpec(**fields)
    budget = fields.get("time_budget_seconds")
    deadline = time.monotonic() + budget if budget else None
    return recipe.plan(spec, pinned_fields(spec), archive, index, device=CPU, deadline=deadline)


def test_candidates_are_scored_and_every_choice_is_recorded(digits):
    plan = planned(digits, time_budget_seconds=60)
    rec = plan.record
    # Every candidate size was measured (a cross-validated score and a speed) or skipped
    # with the reason: too slow for the budget, planning's share of it, or unable to win.
    measured = [c["image_size"] for c in rec["candidates"]]
    skipped = [c["image_size"] for c in rec["not_measured"]]
    assert measured and sorted(measured + skipped) == list(recipe.SIZES)
    assert measured == list(recipe.SIZES)[: len(measured)]  # cheapest first
    assert all(0.0 < c["cv_accuracy"] <= 1.0 for c in rec["candidates"])
    assert all(c["images_per_second"] > 0 for c in rec["candidates"])
    # Digits are 8x8: no costlier size reached the score it needed to be chosen instead
    # (the choice's plus at least the tolerance), and no cheaper one was chosen over it.
    chosen = next(c for c in rec["candidates"] if c["image_size"] == plan.spec.image_size)
    costlier = [c for c in rec["candidates"] if "needed" in c]
    assert all(c["cv_accuracy"] <= c["needed"] for c in costlier), rec["candidates"]
    assert all(c["needed"] >= chosen["cv_accuracy"] + TOLERANCE - 1e-4 for c in costlier)
    assert rec["dataset"]["native_size"] == 8 and rec["dataset"]["grayscale"] is True
    # Flips stay on exactly when mirrored copies did not cost cross-validated accuracy.
    flips = rec["flip_check"]
    helps = flips["with_mirrored_accuracy"] >= flips["accuracy"] - recipe.FLIP_TOLERANCE
    assert flips["hflip"] is helps and plan.spec.augmentation.hflip is helps
    assert plan.spec.time_budget_seconds == 60  # the user's budget stays
    assert rec["choices"]["image_size"] == plan.spec.image_size
    assert plan.spec.strategy in ("lp_ft", "linear_probe")


def test_pinned_fields_are_kept(digits):
    plan = planned(digits, image_size=64, strategy="full", epochs=2, augmentation={"hflip": True})
    assert plan.spec.image_size == 64 and plan.spec.strategy == "full" and plan.spec.epochs == 2
    assert plan.spec.augmentation.hflip is True
    assert [c["image_size"] for c in plan.record["candidates"]] == [64]
    # Epochs set and no budget: no default budget cuts them.
    assert plan.spec.time_budget_seconds is None
    assert set(plan.record["pinned"]) >= {"image_size", "strategy", "epochs", "augmentation"}


def test_no_budget_given_means_a_default_that_fits_the_dataset(digits):
    plan = planned(digits)
    n = len(digits[1]["entries"])
    assert plan.spec.time_budget_seconds >= recipe.MIN_DEFAULT_BUDGET
    assert plan.spec.time_budget_seconds <= recipe.default_budget_cap(n, "cpu")


def test_a_budget_too_small_for_fine_tuning_plans_a_linear_probe(digits):
    plan = planned(digits, time_budget_seconds=5)
    assert plan.spec.strategy == "linear_probe"
    assert plan.record["fitted_epochs"] == 0


@pytest.mark.parametrize("budget", [25.0])
def test_a_planned_job_honours_its_budget_and_beats_chance(digits, tmp_path, budget):
    archive, index, _ = digits
    start = time.monotonic()
    deadline = start + budget
    spec = JobSpec(time_budget_seconds=budget)
    plan = recipe.plan(spec, pinned_fields(spec), archive, index, device=CPU, deadline=deadline)
    data = prepare(archive, index, plan.spec, tmp_path)
    result = fit(plan.spec, data, deadline=deadline)
    took = time.monotonic() - start
    # The probe always completes; the whole job ends near its budget (a slow, shared CI
    # machine may overrun the estimate by one epoch or a final evaluation).
    assert result.history[0]["phase"] == "probe"
    assert took < budget * 1.6, took
    assert result.report["validation"]["top1_accuracy"] > 0.7


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A multi-label upload: 300 digit pairs (two digits side by side on a 16-px square),
    each labelled with the digits present, in a CSV manifest's `labels` column."""
    tmp = tmp_path_factory.mktemp("recipe-pairs")
    proxy = build_pairs(0, n_pairs=300)
    upload = proxy.write_manifest_zip(tmp / "upload.zip", square=True)
    return tmp / "images.zip", ingest_bytes(upload.read_bytes(), tmp / "images.zip").index(), tmp


def test_a_multi_label_plan_scores_by_map_and_never_crops_a_label_out(pairs):
    plan = planned(pairs, time_budget_seconds=30, image_size=96)
    rec = plan.record
    assert rec["scored_on"] == "mAP"
    # Candidates and flips were scored by one-vs-rest probes' mean average precision.
    assert all(0.0 < c["cv_accuracy"] <= 1.0 for c in rec["candidates"])
    flips = rec["flip_check"]
    assert set(flips) == {"map", "with_mirrored_map", "hflip"}
    assert flips["hflip"] is (flips["with_mirrored_map"] >= flips["map"] - recipe.FLIP_TOLERANCE)
    # Images carrying each class (every digit is in about a fifth of the pairs), not the
    # first classes' counts (9 is first only in 9|9 pairs).
    assert rec["dataset"]["imbalance"] < 2
    # The augmentation only shifts the image: a digit at either side is never cropped out.
    ops = [op.params() for op in plan.spec.augmentation.ops]
    assert not any(op["name"] == "random_resized_crop" for op in ops)
    image = torch.zeros(3, 110, 110, dtype=torch.uint8)  # the cache's size for 96 px
    image[:, 50:60, 15:20] = 255  # an object near each side, 15 px from the border
    image[:, 50:60, 90:95] = 255
    transform = train_transform(plan.spec)
    for _ in range(50):
        out = transform(image)[0]
        assert out.shape == (96, 96)
        seen = out > out.min()
        assert seen[:, :48].sum() >= 50 and seen[:, 48:].sum() >= 50  # both wholly kept


def test_a_single_label_plan_keeps_its_area_crop(digits):
    plan = planned(digits, time_budget_seconds=30, image_size=96)
    ops = [op.params() for op in plan.spec.augmentation.ops]
    assert ops[0] == {"name": "random_resized_crop", "scale_min": recipe.AUTO_CROP_SCALE_MIN}


def test_the_flip_check_scores_multi_label_by_map():
    # Two classes present per image; the mirrored copy of an image shows another label set
    # (as a mirrored digit pair swaps and mirrors its digits): training on the copies with
    # the original labels is label noise, and the check measures it by mAP.
    gen = torch.Generator().manual_seed(0)
    n, classes = 240, 6
    targets = torch.zeros(n, classes)
    first = torch.arange(n) % classes
    targets[torch.arange(n), first] = 1
    targets[
        torch.arange(n), (first + 1 + torch.randint(0, classes - 1, (n,), generator=gen)) % classes
    ] = 1
    basis = torch.randn(classes, 32, generator=gen)
    feats = targets @ basis + 0.5 * torch.randn(n, 32, generator=gen)
    shuffled = targets[:, torch.roll(torch.arange(classes), 1)]
    mirrored = shuffled @ basis + 0.5 * torch.randn(n, 32, generator=gen)
    noisy = measure.flip_check(feats, mirrored, targets, classes)
    assert set(noisy) == {"map", "with_mirrored_map"}
    assert noisy["map"] > 0.9 and noisy["with_mirrored_map"] < noisy["map"] - 0.05
    same = measure.flip_check(
        feats, feats + 0.01 * torch.randn(n, 32, generator=gen), targets, classes
    )
    assert abs(same["with_mirrored_map"] - same["map"]) < 0.02


def test_no_costlier_candidate_is_measured_once_one_scores_near_perfect(tmp_path):
    """Stripes, horizontal or vertical, 32 px: the 64-px probe scores 1.0, and since no
    candidate scores above 1.0, none costlier could be chosen (the cheapest within
    TOLERANCE of the best wins): 96 to 224 px are recorded as not measured, and 64 px is
    chosen."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(24):
        stripes = np.zeros((32, 32), np.uint8)
        stripes[:: 2 + i % 3] = 255
        noisy = np.clip(stripes + rng.normal(0, 20, (32, 32)), 0, 255).astype(np.uint8)
        files += [(f"across/{i}.png", png_bytes(noisy)), (f"down/{i}.png", png_bytes(noisy.T))]
    index = ingest_bytes(make_zip(files), tmp_path / "images.zip").index()
    plan = planned((tmp_path / "images.zip", index, None), time_budget_seconds=120)
    rec = plan.record
    assert [c["image_size"] for c in rec["candidates"]] == [64]
    assert rec["candidates"][0]["cv_accuracy"] >= 1.0 - TOLERANCE
    assert [(c["image_size"], c["reason"]) for c in rec["not_measured"]] == [
        (size, recipe.CANNOT_WIN) for size in recipe.SIZES[1:]
    ]
    assert plan.spec.image_size == 64


def test_64_px_is_a_candidate_for_low_resolution_images_only():
    assert recipe.candidate_sizes(8) == [64, 96, 128, 160, 224]
    assert recipe.candidate_sizes(64) == [64, 96, 128, 160, 224]
    # A larger image would lose detail it has: 96 px and up.
    assert recipe.candidate_sizes(65) == [96, 128, 160, 224]
    assert recipe.candidate_sizes(250) == [96, 128, 160, 224]


@pytest.mark.parametrize(
    ("scores", "measured", "chosen", "reason"),
    [
        # 96 px within TOLERANCE of 1.0 and the cheapest: nothing larger can change that.
        ({96: 0.99, 128: 1.0, 160: 1.0, 224: 1.0}, [96], 96, recipe.CANNOT_WIN),
        # 96 px at 0.98 could lose to a larger size's 1.0 (the best rises past 0.995):
        # measuring goes on until the choice (128 px, 0.99) is safe, as a full run chooses.
        ({96: 0.98, 128: 0.99, 160: 1.0, 224: 1.0}, [96, 128, 160], 128, recipe.CANNOT_WIN),
        # Never near 1.0, and a larger size scores better after one that did not: every
        # size is measured.
        ({96: 0.80, 128: 0.90, 160: 0.85, 224: 0.91}, [96, 128, 160, 224], 128, None),
        # Two larger sizes in a row no better than 96 px (ties included): 224 px is not
        # measured (had it been, its 0.95 would have won).
        ({96: 0.80, 128: 0.79, 160: 0.80, 224: 0.95}, [96, 128, 160], 96, recipe.NO_GAIN),
    ],
)
def test_measuring_stops_exactly_when_no_larger_size_can_change_the_choice(
    digits, monkeypatch, scores, measured, chosen, reason
):
    """Scripted scores and speeds (larger sizes slower), the recipe's own choice rule. The
    sizes from 96 px (as for images larger than 64 px)."""
    monkeypatch.setattr(recipe, "SIZES", (96, 128, 160, 224))
    rates = {96: 1000.0, 128: 600.0, 160: 400.0, 224: 200.0}
    sizes: list[int] = []

    def features(model, x, device, backbone=None):
        sizes.append(x.shape[-1])
        return torch.randn(len(x), 8), rates[x.shape[-1]]

    def fit_linear(feats, y, n, loss, **kw):
        return SimpleNamespace(cv_scores={1e-2: scores[sizes[-1]]}, cv_correct={})

    monkeypatch.setattr(measure, "features", features)
    monkeypatch.setattr(recipe, "fit_linear", fit_linear)
    plan = planned(digits, time_budget_seconds=600)
    rec = plan.record
    assert [c["image_size"] for c in rec["candidates"]] == measured
    assert [c["image_size"] for c in rec["not_measured"]] == list(recipe.SIZES)[len(measured) :]
    assert all(c["reason"] == reason for c in rec["not_measured"])
    assert plan.spec.image_size == chosen


@pytest.mark.parametrize(
    ("budget", "measured"),
    [
        (120.0, [96, 128, 160]),  # 14.4 s of planning: 224 px would end at 21.8 s
        (150.0, [96, 128, 160]),  # 18 s: 160 px's cost unscaled (5.5 s) would have started it
        (200.0, [96, 128, 160, 224]),  # 24 s: room for it
    ],
)
def test_a_candidate_whose_measuring_would_take_planning_past_its_share_is_skipped(
    digits, monkeypatch, budget, measured
):
    """A fake clock: measuring a size costs 2, 3.5, 5.5 and 11 s, all of it the timed pass
    (the speed says so). Planning may take 12% of the budget. After 160 px (11 s in), 224
    px would cost about 10.8 s (160 px's pass scaled by the pixels): it is started only when
    planning would still end within its share. The sizes from 96 px (as for images larger
    than 64 px)."""
    monkeypatch.setattr(recipe, "SIZES", (96, 128, 160, 224))
    now = [time.monotonic()]
    cost = {96: 2.0, 128: 3.5, 160: 5.5, 224: 11.0}

    def features(model, x, device, backbone=None):
        now[0] += cost[x.shape[-1]]
        return torch.randn(len(x), 8), len(x) / cost[x.shape[-1]]

    monkeypatch.setattr(recipe, "time", SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(measure, "features", features)
    scores = iter([0.5, 0.51, 0.52, 0.53])  # rising with the size
    monkeypatch.setattr(
        recipe,
        "fit_linear",
        lambda *a, **k: SimpleNamespace(cv_scores={1e-2: next(scores)}, cv_correct={}),
    )
    plan = planned(digits, time_budget_seconds=budget)
    assert [c["image_size"] for c in plan.record["candidates"]] == measured
    skipped = [{"backbone": plan.spec.backbone, "image_size": 224, "reason": "planning time"}]
    assert plan.record["not_measured"] == ([] if 224 in measured else skipped)

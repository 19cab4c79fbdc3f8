"""Which (backbone, size) the auto recipe chooses: the cheapest that no costlier candidate
outscores measurably, on the same images (worker/training/candidates.py)."""

from __future__ import annotations

import numpy as np
import pytest

from worker.training.candidates import (
    TOLERANCE,
    Candidate,
    choice_record,
    choice_settled,
    choose,
    margin,
)


def verdicts(n: int, right: int) -> np.ndarray:
    v = np.zeros(n, dtype=bool)
    v[:right] = True
    return v


def candidate(size: int, correct: np.ndarray | None, score: float | None = None) -> Candidate:
    if score is None:
        assert correct is not None
        score = float(correct.mean())
    return Candidate("lite0", size, score, images_per_second=1e6 / size**2, correct=correct)


def test_a_costlier_size_that_wins_by_noise_is_not_worth_its_cost():
    n = 320
    cheap = verdicts(n, 278)  # 0.869
    costly = cheap.copy()
    costly[278:308] = True  # 30 images it gets right that the cheap one missed...
    costly[:24] = False  # ...and 24 the other way: +1.9 points, above the tolerance
    small, large = candidate(96, cheap), candidate(160, costly)
    assert large.cv_accuracy - small.cv_accuracy > TOLERANCE
    assert margin(small, large) > 0.04  # two standard errors of 54 discordant images
    assert choose([small, large]) is small
    (record, record_large) = choice_record([small, large], small)
    assert "needed" not in record and record_large["needed"] > large.cv_accuracy


def test_a_costlier_size_that_wins_image_after_image_is_chosen():
    n = 320
    cheap = verdicts(n, 250)
    costly = verdicts(n, 280)  # right on every image the cheap one was, and 30 more
    small, large = candidate(96, cheap), candidate(160, costly)
    assert margin(small, large) < large.cv_accuracy - small.cv_accuracy
    assert choose([small, large]) is large


def test_without_verdicts_the_tolerance_alone_decides():
    small, mid, large = (
        candidate(96, None, 0.90),
        candidate(128, None, 0.91),
        candidate(160, None, 0.92),
    )
    assert margin(small, large) == TOLERANCE
    # 0.92 - 0.90 > 0.015: 96 px is out; 128 is within 0.015 of 160 and cheaper.
    assert choose([small, mid, large]) is mid
    assert choose([candidate(96, None, 0.90), candidate(128, None, 0.91)]).size == 96


@pytest.mark.parametrize("n", [0, 1])
def test_too_few_images_for_a_standard_error_fall_back_to_the_tolerance(n):
    a, b = candidate(96, verdicts(n, 0), 0.5), candidate(128, verdicts(n, n), 0.52)
    assert margin(a, b) == TOLERANCE


def test_a_costlier_size_that_scores_lower_than_a_cheaper_one_is_never_chosen():
    """Margins differ pair by pair: 96 px is outscored measurably by 160 px (they agree
    closely), 128 px not (they disagree a lot), yet 128 px scores below 96 px."""
    n = 320
    base = verdicts(n, 275)  # 0.859
    large = base.copy()
    large[275:288] = True  # 0.900: 13 more right, none lost
    mid = np.zeros(n, dtype=bool)
    mid[48:] = True  # 0.850, disagreeing with both on many images
    small, middle, big = candidate(96, base), candidate(128, mid), candidate(160, large)
    assert big.cv_accuracy - small.cv_accuracy > margin(small, big)
    assert big.cv_accuracy - middle.cv_accuracy <= margin(middle, big)
    assert middle.cv_accuracy < small.cv_accuracy
    assert choose([small, middle, big]) is big


def test_measuring_stops_only_when_no_larger_size_could_change_the_choice():
    n = 200
    small = candidate(96, verdicts(n, 197))  # 0.985: exactly the tolerance below 1.0
    assert choice_settled([small])
    perfect = candidate(128, verdicts(n, 200))
    assert choose([small, perfect]) is small  # what choice_settled promised
    assert not choice_settled([candidate(96, verdicts(n, 196))])

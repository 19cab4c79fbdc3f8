"""The auto recipe's candidates (backbone x input size) and which of them it chooses: the
cheapest that no costlier one outscores by a measurable margin."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

TOLERANCE = 0.015  # a costlier candidate must score this much more (cross-validated)
SIGNIFICANCE = 2.0  # ... and this many standard errors of the per-image difference more
EPS = 1e-9  # scores are counts over n: a gap of exactly TOLERANCE is within it


@dataclass
class Candidate:
    backbone: str
    size: int
    cv_accuracy: float
    images_per_second: float  # inference, measured on this device
    seconds: float = 0.0  # what measuring and scoring it took (planning time)
    # Each subsample image's held-out verdict (single-label): the same images and folds
    # for every candidate, so two candidates' scores are compared image by image.
    correct: np.ndarray | None = None

    def record(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "image_size": self.size,
            "cv_accuracy": round(self.cv_accuracy, 4),
            "images_per_second": round(self.images_per_second, 1),
            "seconds": round(self.seconds, 2),
        }


def margin(cheap: Candidate, costly: Candidate) -> float:
    """How much more than `cheap` `costly` must score to be worth its cost: TOLERANCE, or
    SIGNIFICANCE standard errors of their per-image difference when it is larger. On 320
    images the scores are noisy: 1,000 digits scored 0.869 at 96 px, 0.831 at 128 and
    0.888 at 160 (one seed), and 160 px (2.8x the cost a pass, 2 fine-tuning epochs
    where 7 fit at 96 px) tested 0.870 against 0.930."""
    a, b = cheap.correct, costly.correct
    if a is None or b is None or len(a) < 2:
        return TOLERANCE
    assert len(a) == len(b), "candidates are scored on the same images"
    diff = b.astype(float) - a.astype(float)
    return max(TOLERANCE, SIGNIFICANCE * float(diff.std(ddof=1)) / math.sqrt(len(diff)))


def choose(candidates: list[Candidate]) -> Candidate:
    """The cheapest (by measured images/s) candidate that no other outscores by more than
    `margin`: with TOLERANCE alone, the cheapest within TOLERANCE of the best. A candidate
    that one at least as cheap scores at least as well as is never chosen (pairwise
    margins differ: a costlier, lower-scoring size could otherwise pass where a cheaper,
    better one was just outscored)."""

    def dominated(c: Candidate) -> bool:
        return any(
            o is not c
            and o.images_per_second >= c.images_per_second
            and o.cv_accuracy >= c.cv_accuracy
            and (o.images_per_second > c.images_per_second or o.cv_accuracy > c.cv_accuracy)
            for o in candidates
        )

    by_cost = sorted(
        (c for c in candidates if not dominated(c)), key=lambda c: 1.0 / c.images_per_second
    )
    for cheap in by_cost:
        others = (c for c in candidates if c is not cheap)
        if all(c.cv_accuracy - cheap.cv_accuracy <= margin(cheap, c) + EPS for c in others):
            return cheap
    return max(candidates, key=lambda c: c.cv_accuracy)


def choice_settled(candidates: list[Candidate]) -> bool:
    """Can no further, costlier candidate change the choice? It scores 1.0 at most: if
    today's choice scored within TOLERANCE (the least `margin`) of 1.0, no larger size can
    outscore it by more, a new candidate only adds to what the cheaper ones had to match,
    and the choice stays; so the larger sizes are not measured (lfw: 96 px scored 0.9875 and
    128-224 px took 11 of the 14 s of planning). Asked of one backbone's sizes only: another
    backbone's are not always costlier."""
    return 1.0 - choose(candidates).cv_accuracy <= TOLERANCE + EPS


def choice_record(candidates: list[Candidate], chosen: Candidate) -> list[dict[str, Any]]:
    """Every candidate's record; a costlier one's with `needed`: the score above which the
    choice would no longer be chosen (the choice's plus `margin`, at these verdicts)."""
    return [
        c.record()
        | (
            {"needed": round(chosen.cv_accuracy + margin(chosen, c), 4)}
            if c.images_per_second < chosen.images_per_second
            else {}
        )
        for c in candidates
    ]

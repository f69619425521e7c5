"""Length fitting.

RULER's own search steps by 500 essay words (~650 tokens) or 10 noise lines and its retry loop
can spin forever when nothing fits, both unusable for 512-1K contexts. `fit_filler`
binary-searches the filler amount (words, noise lines, distractor needles, QA documents) over
a deterministic build, so a sample is a function of (split, task, length, seed, index) and its
size is the largest that fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .tasks import DataError


@dataclass
class Built:
    prompt: str
    outputs: list[str]
    needles: list[str]
    answer: str  # appended to the prompt for training text
    question: str | None = None  # QA tasks: the question asked (check_disjoint compares them)


def fit_filler(
    build: Callable[[int], Built],
    fits: Callable[[Built], bool],
    *,
    lo: int,
    hi: int,
    limit: int,
    what: str,
) -> Built:
    """The build with the largest filler amount n in [lo, limit] that fits; `build(n)` must be
    deterministic. Binary search between a fitting lo and a non-fitting hi (hi doubles until
    it does not fit, or reaches limit)."""
    cache: dict[int, tuple[Built, bool]] = {}

    def trial(n: int) -> bool:
        if n not in cache:
            b = build(n)
            cache[n] = (b, fits(b))
        return cache[n][1]

    if not trial(lo):
        raise DataError(f"{what}: does not fit even with the least filler; use a longer length")
    hi = max(min(hi, limit), lo + 1)
    while hi < limit and trial(hi):
        lo, hi = hi, min(2 * hi, limit)
    if hi >= limit and trial(limit):
        return cache[limit][0]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if trial(mid):
            lo = mid
        else:
            hi = mid
    return cache[lo][0]

"""The longest sequence that fits: exponential search, then bisection, over multiples of a step.

Every probe is a whole subprocess run (seconds to a minute), so the search asks as few questions
as it can: it doubles from a starting guess until something does not fit (or halves until
something does), then bisects the gap down to one step. `fits` must be monotone (if a length
fits, every shorter one does); answers are memoised so no length is probed twice.
"""
from __future__ import annotations

from typing import Callable


def longest_fitting(fits: Callable[[int], bool], step: int, limit: int, start: int | None = None) -> int:
    """The largest multiple of `step` in [step, limit] for which `fits` holds; 0 if not even `step` fits."""
    if step < 1 or limit < step:
        raise ValueError(f"need 1 <= step <= limit, got step={step}, limit={limit}")
    top = limit // step
    memo: dict[int, bool] = {}

    def ok(units: int) -> bool:
        if units not in memo:
            memo[units] = bool(fits(units * step))
        return memo[units]

    guess = min(max(1, (start or step) // step), top)
    if ok(guess):
        good, bad = guess, None
        while bad is None and good < top:
            trial = min(2 * good, top)
            if ok(trial):
                good = trial
            else:
                bad = trial
        if bad is None:
            return good * step
    else:
        good, bad = 0, guess
        while good == 0 and bad > 1:
            trial = bad // 2
            if ok(trial):
                good = trial
            else:
                bad = trial
        if good == 0:
            return 0
    while bad - good > 1:
        middle = (good + bad) // 2
        if ok(middle):
            good = middle
        else:
            bad = middle
    return good * step

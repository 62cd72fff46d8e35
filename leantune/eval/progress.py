"""Progress bars of the evaluation phases (generating text, running tests in the sandbox).

Like the training bar they are tqdm bars on stderr that the `progress` setting turns off; they
are also off when stderr is not a terminal, where each phase's closing summary line is the record.
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, unit: str, enabled: bool) -> tqdm:
    """A bar over `total` units; `update(0)` redraws it (at most every half second) to keep the clock moving.
    Nothing to do (total 0) shows no bar."""
    # disable=None: tqdm's own check, off unless stderr is a terminal
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None if enabled and total else True,
                dynamic_ncols=True, mininterval=0.5, miniters=0, leave=False)

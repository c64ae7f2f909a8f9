"""Named moments at which a test can make the process kill itself with SIGKILL.

The crash test must kill at chosen moments (inside a warehouse write, between commit and publish,
after some answers are cached...), not whenever a timer happens to fire. Code marks those moments
with `crash_point("name")`; with MODEL_EVAL_CRASH_AT=name (or name#n for the n-th time the moment is
reached in this process, see `crash_point`) the process prints the point to stderr and sends itself
SIGKILL there. Unset, a crash point is one environment lookup.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

CRASH_AT_ENV = "MODEL_EVAL_CRASH_AT"
_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Kill this process here if MODEL_EVAL_CRASH_AT names this moment.

    The setting is `point` (the first time it is reached), `point#n` (the n-th time) or
    `point@earlier` / `point@earlier#n` (the first time after the point `earlier` was reached, or
    reached n times: e.g. `warehouse.publish@scores.scored` is the atomic publish of the scores write).
    """
    wanted = os.environ.get(CRASH_AT_ENV)
    if not wanted:
        return
    _reached[name] += 1
    target, _, earlier = wanted.partition("@")
    point, _, nth = target.partition("#")
    if name != point:
        return
    if earlier:
        earlier_point, _, earlier_nth = earlier.partition("#")
        if _reached[earlier_point] < int(earlier_nth or 1):
            return
    elif _reached[name] != int(nth or 1):
        return
    sys.stderr.write(f"crash point {wanted} reached: SIGKILL pid {os.getpid()}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)

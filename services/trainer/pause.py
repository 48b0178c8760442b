"""A test-only pause: holds a run at a named phase of a given step until a test releases it.

    OPD_TEST_PAUSE="sample:2 score:3 train:5"     # phase:step points, space- or comma-separated
    OPD_TEST_PAUSE_DIR=/tmp/pause                  # where the run says it waits, and the test releases it

At a listed point the run writes `<dir>/<phase>-<step>.paused` (atomically) and
waits until `<dir>/<phase>-<step>.release` exists. A chaos test waits for the
marker, does its fault (kills a service) and writes the release file: the
fault lands at a known point of the run, however fast or slow the machine.

Choices:
1) Phases are the step's parts, in order: "sample" (before the rollouts),
   "score" (rollouts in hand, before the teacher scores them), "train"
   (before the update), "sync" (before the new version goes to the student).
   loop.py calls `pause_point` once per phase.
2) Unset, it costs one environment lookup per phase, and reads nothing else.
3) The wait ignores stop requests: a held run stands for a step that takes
   long, so a test can Ctrl-C during a step. A released point stays released:
   a restarted trainer that runs the step again passes straight through.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PHASES = ("sample", "score", "train", "sync")
POLL_S = 0.05


def pause_point(phase: str, step: int) -> None:
    """Waits here if OPD_TEST_PAUSE names `phase:step`; returns at once otherwise."""
    points = os.environ.get("OPD_TEST_PAUSE")
    if not points or f"{phase}:{step}" not in points.replace(",", " ").split():
        return
    folder = Path(os.environ["OPD_TEST_PAUSE_DIR"])
    name = f"{phase}-{step}"
    partial = folder / f".{name}.paused.tmp"
    partial.write_text(f"{os.getpid()}\n")
    partial.replace(folder / f"{name}.paused")
    while not (folder / f"{name}.release").exists():
        time.sleep(POLL_S)

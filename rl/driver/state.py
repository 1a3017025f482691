"""What outlives a run's process: `state.json` in the run's folder (the next step, the checkpoint to resume
from, the token totals, the wandb run id), written atomically, and `LearnerLost`, which says the run can go on
from it. Light to import: `rl-train` reads it before it starts anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STATE = "state.json"


class LearnerLost(RuntimeError):
    """The run's learner actor died (its process or its node): the run can go on from its last checkpoint."""


def read_state(folder: Path) -> dict | None:
    path = folder / STATE
    return json.loads(path.read_text()) if path.exists() else None


def write_state(folder: Path, state: dict) -> None:
    staging = folder / f".{STATE}.tmp"
    with open(staging, "w") as file:
        json.dump(state, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    staging.replace(folder / STATE)

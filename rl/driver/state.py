"""What outlives a run's process: `state.json` in the run's folder (the next step, the checkpoint to resume
from, the token totals, the wandb run id) and `eval_baseline.json`, written atomically, and `LearnerLost`, which
says the run can go on from it; and a finished run's adapter, which another run can start from (`model.adapter`).
Light to import: `rl-train` reads it before it starts anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rl.weights import ADAPTER_CONFIG, ADAPTER_WEIGHTS

STATE = "state.json"
EVAL_BASELINE = "eval_baseline.json"
"""The run's first evaluation's answers, which a pairwise judge's eval/win_rate compares each later one's with."""
CHECKPOINTS = "checkpoints"
"""The run folder's subfolder that holds its checkpoints (`Learner.create(storage=...)`)."""


class LearnerLost(RuntimeError):
    """The run's learner actor died (its process or its node): the run can go on from its last checkpoint."""


def read_state(folder: Path) -> dict | None:
    path = folder / STATE
    return json.loads(path.read_text()) if path.exists() else None


def write_state(folder: Path, state: dict) -> None:
    write_json(folder / STATE, state, indent=1)


def write_json(path: Path, data, *, indent: int | None = None) -> None:
    """`data` as `path`, atomically: a crash leaves the old file or the new one, never half of one."""
    staging = path.with_name(f".{path.name}.tmp")
    with open(staging, "w") as file:
        json.dump(data, file, indent=indent)
        file.flush()
        os.fsync(file.fileno())
    staging.replace(path)


def adapter_folder(path: str | Path, key: str = "model.adapter") -> Path:
    """The PEFT adapter folder that `model.adapter` (or the setting `key`) names: the folder itself (any run's
    checkpoint, what save_weights_for_sampler publishes, an adapter from the HF hub saved locally), or for a run's
    folder its latest checkpoint (state.json). A ValueError says what the path is not."""
    folder = Path(path)
    state = read_state(folder) if folder.is_dir() else None
    if state is not None:
        try:
            folder = checkpoint_folder(folder, state["checkpoint"])
        except ValueError as error:
            raise ValueError(f"{key}={path}: {error}") from None
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{key}={path}: not a PEFT adapter folder (it lacks {', '.join(missing)}" + (
            f" in its latest checkpoint, {folder}" if state is not None else "") + ") nor a run folder with a "
            f"{STATE}")
    return folder


def checkpoint_folder(run_folder: Path, tinker_path: str) -> Path:
    """The folder of the run's checkpoint `tinker_path` in `run_folder`; a ValueError where it is not there (a
    learner on another node keeps it there)."""
    from rl.checkpoints import CheckpointStore  # imported here: rl-train reads this module before anything

    # The run's own store finds it (and puts back one a crash left half-replaced).
    return CheckpointStore(run_folder / CHECKPOINTS).folder(tinker_path)

"""The checkpoint store: every checkpoint of every run, in one folder tree, written atomically.

Layout: `ROOT/RUN/weights/NAME/` (training state) and `ROOT/RUN/sampler_weights/NAME/` (a PEFT adapter folder),
each with a `checkpoint.json` that records when it was written and what its writer wants to remember.
A checkpoint is written into a hidden staging folder beside its final place and renamed into it: a crash at
any moment leaves the previous checkpoint of that name intact and never a half-written one under the name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rl.types import Checkpoint, CheckpointType, ParsedCheckpointTinkerPath, check_checkpoint_name

METADATA_FILE = "checkpoint.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_FOLDERS: dict[CheckpointType, str] = {"training": "weights", "sampler": "sampler_weights"}


def tinker_path(run_id: str, kind: CheckpointType, name: str) -> str:
    return f"tinker://{run_id}/{_FOLDERS[kind]}/{name}"


def adapter_content_hash(files: dict[str, bytes]) -> str:
    """sha256 over a PEFT adapter's config and weights: what a sampler proves it loaded."""
    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        digest.update(files[name])
    return digest.hexdigest()


def read_adapter(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}


@dataclass(frozen=True)
class SamplerWeights:
    """A published adapter as bytes, to travel through Ray's object store to samplers on any node."""

    tinker_path: str
    content_hash: str
    files: dict[str, bytes]


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


class CheckpointStore:
    """Checkpoints under `root`, addressed by their `tinker://` paths."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, path: str, *, kind: CheckpointType | None = None) -> Path:
        """The folder of an existing checkpoint; a ValueError if there is none or it is of the wrong kind."""
        parsed = ParsedCheckpointTinkerPath.from_tinker_path(path)
        if kind is not None and parsed.checkpoint_type != kind:
            wanted = _FOLDERS[kind]
            raise ValueError(f"{path} is a {parsed.checkpoint_type} checkpoint; this needs tinker://RUN/{wanted}/NAME")
        folder = self.root / parsed.training_run_id / parsed.checkpoint_id
        if not (folder / METADATA_FILE).is_file():
            raise ValueError(f"no checkpoint at {path}")
        return folder

    def metadata(self, path: str) -> dict[str, Any]:
        return json.loads((self.folder(path) / METADATA_FILE).read_text())

    def write(self, run_id: str, kind: CheckpointType, name: str, fill: Callable[[Path], dict[str, Any]], *,
              metadata: dict[str, Any], overwrite: bool = False) -> Checkpoint:
        """Creates checkpoint `name` of `run_id` atomically.

        `fill(folder)` writes the checkpoint's files and returns metadata of its own (a content hash, say),
        recorded with `metadata` in checkpoint.json; then the folder is renamed into place.
        """
        check_checkpoint_name(name)
        parent = self.root / run_id / _FOLDERS[kind]
        final = parent / name
        if final.exists() and not overwrite:
            raise ValueError(f"checkpoint {tinker_path(run_id, kind, name)} exists; pass overwrite=True to replace it")
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=parent))
        try:
            written = fill(staging)
            record = {"time": datetime.now(UTC).isoformat(), "size_bytes": folder_size(staging), **metadata,
                      **written}
            (staging / METADATA_FILE).write_text(json.dumps(record, indent=1))
            _sync_folder(staging)
            if final.exists():
                retired = Path(tempfile.mkdtemp(prefix=f".{name}.retired-", dir=parent))
                final.rename(retired / name)
                staging.rename(final)
                shutil.rmtree(retired)
            else:
                staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self._describe(run_id, kind, final)

    def list(self, run_id: str) -> list[Checkpoint]:
        """The run's checkpoints, oldest first."""
        found = []
        for kind, folder_name in _FOLDERS.items():
            parent = self.root / run_id / folder_name
            if parent.is_dir():
                found += [self._describe(run_id, kind, folder) for folder in parent.iterdir()
                          if not folder.name.startswith(".") and (folder / METADATA_FILE).is_file()]
        return sorted(found, key=lambda checkpoint: checkpoint.time)

    def delete(self, path: str) -> None:
        folder = self.folder(path)
        retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.retired-", dir=folder.parent))
        folder.rename(retired / folder.name)
        shutil.rmtree(retired)

    def _describe(self, run_id: str, kind: CheckpointType, folder: Path) -> Checkpoint:
        record = json.loads((folder / METADATA_FILE).read_text())
        return Checkpoint(checkpoint_id=f"{_FOLDERS[kind]}/{folder.name}", checkpoint_type=kind,
                          time=datetime.fromisoformat(record["time"]), size_bytes=record["size_bytes"],
                          tinker_path=tinker_path(run_id, kind, folder.name))


def _sync_folder(folder: Path) -> None:
    """Flushes the staged files to disk before the rename publishes them."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())

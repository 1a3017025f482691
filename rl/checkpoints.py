"""The checkpoint store: every checkpoint of every run, in one folder tree, written atomically.

Layout: `ROOT/RUN/weights/NAME/` (training state) and `ROOT/RUN/sampler_weights/NAME/` (a PEFT adapter folder),
each with a `checkpoint.json` that records when it was written, when it expires (if it has a time to live),
the user's metadata and what its writer wants to remember. An expired checkpoint is removed the next time its
run's checkpoints are listed, it is asked for, or its name is written again.
A checkpoint is written into a hidden staging folder beside its final place and renamed into it: a crash at
any moment leaves the previous checkpoint of that name intact and never a half-written one under the name. One
that replaces another moves the old one aside first (`.NAME.replaced-*`): a crash between the two renames leaves
no checkpoint under the name until the store next looks for it there, and then the old one is moved back (a
listing also clears one left beside its successor).

With a storage URI (any fsspec URL: s3://bucket/prefix, gs://..., file:///shared/...), every checkpoint is also
uploaded there, with the same layout, before it is renamed into place locally; its checkpoint.json goes last, so
a checkpoint exists in the URI only once all its files do. A checkpoint missing from the local folder (a learner
restarted on another node) is downloaded from the URI on first use. The local folder is then a cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fsspec

from rl.types import Checkpoint, CheckpointType, ParsedCheckpointTinkerPath, check_checkpoint_name

METADATA_FILE = "checkpoint.json"
_FOLDERS: dict[CheckpointType, str] = {"training": "weights", "sampler": "sampler_weights",
                                       "external": "external_weights"}
REPLACED = ".replaced-"
"""Infix of the hidden folder an overwritten checkpoint waits in while its successor is renamed into place."""


def tinker_path(run_id: str, kind: CheckpointType, name: str) -> str:
    return f"tinker://{run_id}/{_FOLDERS[kind]}/{name}"


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


class CheckpointStore:
    """Checkpoints under `root` (and `storage_uri` when given), addressed by their `tinker://` paths."""

    def __init__(self, root: Path | str, *, storage_uri: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage_uri = storage_uri
        self._remote, self._remote_root = fsspec.core.url_to_fs(storage_uri) if storage_uri else (None, "")
        self._placed: dict[str, Path] = {}

    def place(self, run_id: str, folder: Path | str) -> None:
        """Keeps `run_id`'s checkpoints in `folder` instead of ROOT/RUN (a sweep's runs share one learner, and each
        keeps its checkpoints in its own run folder)."""
        self._placed[run_id] = Path(folder)
        self._placed[run_id].mkdir(parents=True, exist_ok=True)

    def _run_folder(self, run_id: str) -> Path:
        return self._placed.get(run_id) or self.root / run_id

    def folder(self, path: str, *, kind: CheckpointType | None = None) -> Path:
        """The folder of an existing checkpoint; a ValueError if there is none or it is of the wrong kind."""
        parsed = ParsedCheckpointTinkerPath.from_tinker_path(path)
        if kind is not None and parsed.checkpoint_type != kind:
            wanted = _FOLDERS[kind]
            raise ValueError(f"{path} is a {parsed.checkpoint_type} checkpoint; this needs tinker://RUN/{wanted}/NAME")
        folder = self._run_folder(parsed.training_run_id) / parsed.checkpoint_id
        if not (folder / METADATA_FILE).is_file():
            _restore_replaced(folder.parent)
        if not (folder / METADATA_FILE).is_file() and self._remote is not None:
            self._download(self._remote_folder(parsed.training_run_id, parsed.checkpoint_id), folder)
        if not (folder / METADATA_FILE).is_file():
            raise ValueError(f"no checkpoint at {path}" + (f" (nor in {self.storage_uri})" if self._remote else ""))
        expires_at = json.loads((folder / METADATA_FILE).read_text()).get("expires_at")
        if _expired(expires_at):
            self._remove(parsed, folder)
            raise ValueError(f"no checkpoint at {path}: it expired at {expires_at} and was removed")
        return folder

    def metadata(self, path: str) -> dict[str, Any]:
        return json.loads((self.folder(path) / METADATA_FILE).read_text())

    def write(self, run_id: str, kind: CheckpointType, name: str, fill: Callable[[Path], dict[str, Any]], *,
              metadata: dict[str, Any], overwrite: bool = False, ttl_seconds: int | None = None,
              user_metadata: dict[str, str] | None = None) -> Checkpoint:
        """Creates checkpoint `name` of `run_id` atomically.

        `fill(folder)` writes the checkpoint's files and returns metadata of its own (a content hash, say),
        recorded with `metadata` in checkpoint.json; then the folder is renamed into place. With `ttl_seconds`
        the checkpoint expires that long after it is written.
        """
        check_checkpoint_name(name)
        parent = self._run_folder(run_id) / _FOLDERS[kind]
        final = parent / name
        if not final.exists():
            _restore_replaced(parent)
        if (final / METADATA_FILE).is_file() and _expired(json.loads((final / METADATA_FILE).read_text())
                                                          .get("expires_at")):
            self._remove(ParsedCheckpointTinkerPath.from_tinker_path(tinker_path(run_id, kind, name)), final)
        if final.exists() and not overwrite:
            raise ValueError(f"checkpoint {tinker_path(run_id, kind, name)} exists; pass overwrite=True to replace it")
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=parent))
        try:
            written = fill(staging)
            now = datetime.now(UTC)
            record = {"time": now.isoformat(), "size_bytes": folder_size(staging), **metadata, **written,
                      "expires_at": _expiry(now, ttl_seconds), "user_metadata": user_metadata}
            (staging / METADATA_FILE).write_text(json.dumps(record, indent=1))
            _sync_folder(staging)
            if self._remote is not None:
                self._upload(staging, self._remote_folder(run_id, f"{_FOLDERS[kind]}/{name}"))
            if final.exists():
                aside = Path(tempfile.mkdtemp(prefix=f".{name}{REPLACED}", dir=parent))
                final.rename(aside / name)
                staging.rename(final)
                shutil.rmtree(aside)
            else:
                staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self._describe(run_id, kind, name, record)

    def list(self, run_id: str) -> list[Checkpoint]:
        """The run's checkpoints (here and in the storage URI), oldest first; expired ones are removed."""
        found: dict[str, Checkpoint] = {}
        for kind, folder_name in _FOLDERS.items():
            if self._remote is not None:
                for metadata in self._remote.glob(f"{self._remote_folder(run_id, folder_name)}/*/{METADATA_FILE}"):
                    name = metadata.rsplit("/", 2)[-2]
                    found[tinker_path(run_id, kind, name)] = self._describe(
                        run_id, kind, name, json.loads(self._remote.cat_file(metadata)))
            parent = self._run_folder(run_id) / folder_name
            if parent.is_dir():
                _restore_replaced(parent)
                for folder in parent.iterdir():
                    if not folder.name.startswith(".") and (folder / METADATA_FILE).is_file():
                        found[tinker_path(run_id, kind, folder.name)] = self._describe(
                            run_id, kind, folder.name, json.loads((folder / METADATA_FILE).read_text()))
        for checkpoint in [c for c in found.values() if _expired(c.expires_at and c.expires_at.isoformat())]:
            self._remove(ParsedCheckpointTinkerPath.from_tinker_path(checkpoint.tinker_path))
            del found[checkpoint.tinker_path]
        return sorted(found.values(), key=lambda checkpoint: checkpoint.time)

    def files(self, path: str) -> dict[str, Path]:
        """A checkpoint's files by their path relative to its folder (its checkpoint.json aside)."""
        folder = self.folder(path)
        return {file.relative_to(folder).as_posix(): file for file in sorted(folder.rglob("*"))
                if file.is_file() and file.name != METADATA_FILE}

    def delete(self, path: str) -> None:
        self._remove(ParsedCheckpointTinkerPath.from_tinker_path(path), self.folder(path))

    def set_ttl(self, path: str, ttl_seconds: int | None) -> Checkpoint:
        """The checkpoint expires `ttl_seconds` from now (None: never), recorded atomically here and in the URI."""
        parsed, folder = ParsedCheckpointTinkerPath.from_tinker_path(path), self.folder(path)
        record = json.loads((folder / METADATA_FILE).read_text())
        record["expires_at"] = _expiry(datetime.now(UTC), ttl_seconds)
        staged = folder / f".{METADATA_FILE}.staging"
        staged.write_text(json.dumps(record, indent=1))
        if self._remote is not None:
            self._put_metadata(staged, f"{self._remote_folder(parsed.training_run_id, parsed.checkpoint_id)}"
                                       f"/{METADATA_FILE}")
        os.replace(staged, folder / METADATA_FILE)
        return self._describe(parsed.training_run_id, parsed.checkpoint_type, parsed.name, record)

    def _remove(self, parsed: ParsedCheckpointTinkerPath, folder: Path | None = None) -> None:
        if self._remote is not None:
            remote = self._remote_folder(parsed.training_run_id, parsed.checkpoint_id)
            if self._remote.exists(remote):
                self._remote.rm(remote, recursive=True)
        folder = folder or self._run_folder(parsed.training_run_id) / parsed.checkpoint_id
        if folder.is_dir():
            retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.retired-", dir=folder.parent))
            folder.rename(retired / folder.name)
            shutil.rmtree(retired)

    def _describe(self, run_id: str, kind: CheckpointType, name: str, record: dict[str, Any]) -> Checkpoint:
        expires_at = record.get("expires_at")
        return Checkpoint(checkpoint_id=f"{_FOLDERS[kind]}/{name}", checkpoint_type=kind,
                          time=datetime.fromisoformat(record["time"]), size_bytes=record["size_bytes"],
                          tinker_path=tinker_path(run_id, kind, name), user_metadata=record.get("user_metadata"),
                          expires_at=expires_at and datetime.fromisoformat(expires_at))

    # ---- the storage URI -------------------------------------------------------------------------------------

    def _remote_folder(self, run_id: str, checkpoint_id: str) -> str:
        return f"{self._remote_root.rstrip('/')}/{run_id}/{checkpoint_id}"

    def _upload(self, folder: Path, remote: str) -> None:
        """Copies a staged checkpoint to the URI, checkpoint.json last (a replaced one loses its own first)."""
        if self._remote.exists(f"{remote}/{METADATA_FILE}"):
            self._remote.rm(f"{remote}/{METADATA_FILE}")
        files = sorted(path for path in folder.rglob("*") if path.is_file())
        for path in sorted(files, key=lambda path: path.name == METADATA_FILE):
            target = f"{remote}/{path.relative_to(folder).as_posix()}"
            self._remote.makedirs(target.rsplit("/", 1)[0], exist_ok=True)  # object stores have no folders: no-op
            if path.name == METADATA_FILE:
                self._put_metadata(path, target)
            else:
                self._remote.put_file(str(path), target)

    def _put_metadata(self, path: Path, target: str) -> None:
        """checkpoint.json into the URI whole or not at all: a process killed while copying it into a file:// URI
        left it empty, which made every later listing of the run fail. An object store's put is whole already;
        a filesystem's is a copy, so it goes to a staging name and is renamed."""
        staged = f"{target}.staging-{os.getpid()}"
        self._remote.put_file(str(path), staged)
        self._remote.mv(staged, target)

    def _download(self, remote: str, folder: Path) -> None:
        """Copies a complete checkpoint from the URI into the local folder, atomically; nothing if it has none."""
        if not self._remote.exists(f"{remote}/{METADATA_FILE}"):
            return
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.download-", dir=folder.parent))
        try:
            for path in self._remote.find(remote):
                local = staging / path[len(remote) + 1:]
                local.parent.mkdir(parents=True, exist_ok=True)
                self._remote.get_file(path, str(local))
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _expiry(now: datetime, ttl_seconds: int | None) -> str | None:
    return None if ttl_seconds is None else (now + timedelta(seconds=ttl_seconds)).isoformat()


def _expired(expires_at: str | None) -> bool:
    return expires_at is not None and datetime.fromisoformat(expires_at) <= datetime.now(UTC)


def _restore_replaced(parent: Path) -> None:
    """Puts back a checkpoint that an overwrite moved aside when a crash kept its successor from taking its place,
    and removes one left beside its successor (a crash after the second rename). A lookup of a checkpoint that is
    in place does not call it: it lists the folder."""
    if not parent.is_dir():
        return
    for aside in parent.glob(f".*{REPLACED}*"):
        name = aside.name[1:].rsplit(REPLACED, 1)[0]
        if not (parent / name).exists() and (aside / name / METADATA_FILE).is_file():
            (aside / name).rename(parent / name)
        shutil.rmtree(aside, ignore_errors=True)


def _sync_folder(folder: Path) -> None:
    """Flushes the staged files to disk before the rename publishes them."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())

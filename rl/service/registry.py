"""Who owns what: API keys, sessions, training runs and public checkpoints, kept in the storage folder.

Each configured API key is one user. A user sees their own runs and checkpoints, plus checkpoints made public;
anyone else's run is "not found". With no keys configured there is one user, "local", and the server listens on
loopback only. The registry is rewritten atomically (`service.json`) after every change, so a restarted server
on the same storage folder lists the same runs and checkpoints.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from datetime import UTC, datetime
from pathlib import Path

from rl.types import ParsedCheckpointTinkerPath

LOCAL_USER = "local"


class AccessDenied(PermissionError):
    """An API key the server does not know."""


class Registry:
    def __init__(self, folder: Path | str, api_keys: list[str]):
        self.path = Path(folder) / "service.json"
        bad = [key for key in api_keys if not key.startswith("tml-")]
        if bad:
            raise ValueError(f"API keys must start with 'tml-' (the Tinker SDK refuses others): {bad[0][:8]}...")
        self.users = {key: f"user-{index}" for index, key in enumerate(api_keys)}
        saved = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.runs: dict[str, dict] = saved.get("runs", {})
        self.public: set[str] = set(saved.get("public", []))
        self.run_states: dict[str, dict] = saved.get("run_states", {})
        """model_id -> {"restore_point": [checkpoint path, with optimizer] or None (a new adapter), "changed":
        whether the run trained since}: how a replaced learner or a restarted server restores the run, and
        whether it tells the user that work was lost."""
        self.sessions: dict[str, dict] = {}
        """session_id -> {"owner", "user_metadata", "display_name"}, for this server's lifetime (as the SDK's)."""
        self._lock = threading.Lock()

    def user(self, api_key: str | None) -> str:
        if not self.users:
            return LOCAL_USER
        if api_key not in self.users:
            raise AccessDenied("unknown API key")
        return self.users[api_key]

    def new_session(self, user: str, user_metadata: dict | None = None, display_name: str | None = None) -> str:
        session_id = f"session-{secrets.token_hex(6)}"
        self.sessions[session_id] = {"owner": user, "user_metadata": user_metadata, "display_name": display_name}
        return session_id

    def check_session(self, user: str, session_id: str) -> dict:
        """The session, if it is one of `user`'s; a ValueError otherwise."""
        session = self.sessions.get(session_id)
        if session is None or session["owner"] != user:
            raise ValueError(f"unknown session_id {session_id!r}")
        return session

    def add_run(self, user: str, model_id: str, base_model: str, lora: dict, user_metadata: dict | None) -> None:
        self.runs[model_id] = {"owner": user, "base_model": base_model, "lora": lora, "created": now(),
                               "last_request_time": now(), "user_metadata": user_metadata}
        self.save()

    def run(self, user: str, model_id: str) -> dict:
        """The run, if `user` owns it; anyone else gets the same "unknown" as for a run that does not exist."""
        run = self.runs.get(model_id)
        if run is None or run["owner"] != user:
            raise ValueError(f"unknown model_id {model_id!r}")
        return run

    def touch(self, model_id: str) -> None:
        self.runs[model_id]["last_request_time"] = now()

    def owned_runs(self, user: str) -> list[tuple[str, dict]]:
        return sorted(((model_id, run) for model_id, run in self.runs.items() if run["owner"] == user),
                      key=lambda pair: pair[1]["created"])

    def readable(self, user: str, tinker_path: str) -> bool:
        """Whether `user` may load or sample a checkpoint: theirs, or public."""
        run = self.runs.get(ParsedCheckpointTinkerPath.from_tinker_path(tinker_path).training_run_id)
        return tinker_path in self.public or (run is not None and run["owner"] == user)

    def run_state(self, model_id: str) -> dict:
        """The run's restore point and whether it changed since; a run with no record (made by a server before
        these were kept) counts as changed."""
        return self.run_states.get(model_id, {"restore_point": None, "changed": True})

    def set_run_state(self, model_id: str, restore_point: tuple[str, bool] | None, *, changed: bool) -> None:
        state = {"restore_point": list(restore_point) if restore_point else None, "changed": changed}
        if self.run_states.get(model_id) != state:  # saved on a change only: not on every training step
            self.run_states[model_id] = state
            self.save()

    def set_public(self, tinker_path: str, public: bool) -> None:
        if (tinker_path in self.public) != public:
            (self.public.add if public else self.public.discard)(tinker_path)
            self.save()

    def save(self) -> None:
        with self._lock:
            staging = self.path.with_suffix(".tmp")
            staging.write_text(json.dumps({"runs": self.runs, "public": sorted(self.public),
                                           "run_states": self.run_states}, indent=1))
            with open(staging) as file:
                os.fsync(file.fileno())
            staging.replace(self.path)


def now() -> str:
    return datetime.now(UTC).isoformat()

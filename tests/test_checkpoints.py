"""The checkpoint store: atomic writes, listing, overwrite and delete."""

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rl.checkpoints import CheckpointStore


def write_text(text: str):
    def fill(folder):
        (folder / "payload.txt").write_text(text)
        return {"note": text}

    return fill


def test_write_list_and_read_back(tmp_path):
    store = CheckpointStore(tmp_path)
    first = store.write("run-1", "training", "a", write_text("one"), metadata={"step": 1})
    second = store.write("run-1", "sampler", "b", write_text("two!"), metadata={"step": 2})
    assert first.tinker_path == "tinker://run-1/weights/a" and second.tinker_path == "tinker://run-1/sampler_weights/b"
    listed = store.list("run-1")
    assert [c.tinker_path for c in listed] == [first.tinker_path, second.tinker_path], "oldest first"
    assert listed[0].size_bytes == 3 and listed[1].size_bytes == 4
    assert store.metadata(first.tinker_path) | {"time": None} == {"time": None, "size_bytes": 3, "step": 1,
                                                                   "note": "one", "expires_at": None,
                                                                   "user_metadata": None}
    assert (store.folder(second.tinker_path) / "payload.txt").read_text() == "two!"
    assert store.list("nobody") == []


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    store = CheckpointStore(tmp_path)
    path = store.write("run-1", "training", "a", write_text("good"), metadata={}).tinker_path

    def crash(folder):
        (folder / "payload.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.write("run-1", "training", "a", crash, metadata={}, overwrite=True)
    assert (store.folder(path) / "payload.txt").read_text() == "good"
    assert sorted(p.name for p in (tmp_path / "run-1" / "weights").iterdir()) == ["a"], "no staging left over"


def test_a_crash_between_the_renames_of_an_overwrite_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    path = store.write("run-1", "training", "a", write_text("old"), metadata={}).tinker_path
    weights = tmp_path / "run-1" / "weights"
    rename = Path.rename

    def killed_before_the_new_one_is_in_place(self, target):
        if ".staging-" in self.name and Path(target) == weights / "a":
            raise OSError("killed")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_new_one_is_in_place)
    with pytest.raises(OSError, match="killed"):
        store.write("run-1", "training", "a", write_text("new"), metadata={}, overwrite=True)
    monkeypatch.undo()
    assert not (weights / "a").exists(), "the old one was moved aside"
    assert (store.folder(path) / "payload.txt").read_text() == "old"
    assert sorted(p.name for p in weights.iterdir()) == ["a"]
    # One left beside its successor (a crash after the second rename) goes at the next look.
    store.write("run-1", "training", "a", write_text("new"), metadata={}, overwrite=True)
    (weights / ".a.replaced-x" / "a").mkdir(parents=True)
    (weights / ".a.replaced-x" / "a" / "checkpoint.json").write_text("{}")
    assert [checkpoint.tinker_path for checkpoint in store.list("run-1")] == [path]
    assert (store.folder(path) / "payload.txt").read_text() == "new"
    assert sorted(p.name for p in weights.iterdir()) == ["a"]


def test_overwrite_and_delete(tmp_path):
    store = CheckpointStore(tmp_path)
    path = store.write("run-1", "training", "a", write_text("old"), metadata={}).tinker_path
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        store.write("run-1", "training", "a", write_text("new"), metadata={})
    store.write("run-1", "training", "a", write_text("new"), metadata={}, overwrite=True)
    assert (store.folder(path) / "payload.txt").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "run-1" / "weights").iterdir()) == ["a"]
    store.delete(path)
    assert store.list("run-1") == []
    with pytest.raises(ValueError, match="no checkpoint at"):
        store.folder(path)
    with pytest.raises(ValueError, match="checkpoint name"):
        store.write("run-1", "training", "../escape", write_text("x"), metadata={})


def test_a_storage_uri_holds_the_checkpoints_for_a_learner_on_another_node(tmp_path):
    uri = f"file://{tmp_path / 'bucket'}/runs"
    here = CheckpointStore(tmp_path / "node-a", storage_uri=uri)
    path = here.write("run-1", "training", "a", write_text("weights"), metadata={"step": 3}).tinker_path
    here.write("run-1", "sampler", "b", write_text("adapter"), metadata={})
    assert (tmp_path / "bucket" / "runs" / "run-1" / "weights" / "a" / "payload.txt").read_text() == "weights"

    elsewhere = CheckpointStore(tmp_path / "node-b", storage_uri=uri)  # an empty local folder, the same URI
    assert [c.tinker_path for c in elsewhere.list("run-1")] == [c.tinker_path for c in here.list("run-1")]
    assert (elsewhere.folder(path) / "payload.txt").read_text() == "weights", "downloaded on first use"
    assert elsewhere.metadata(path) == here.metadata(path)
    assert not [p for p in (tmp_path / "node-b" / "run-1" / "weights").iterdir() if p.name.startswith(".")]
    elsewhere.delete(path)
    assert not (tmp_path / "bucket" / "runs" / "run-1" / "weights" / "a").exists()
    with pytest.raises(ValueError, match=r"no checkpoint at .* \(nor in file://"):
        CheckpointStore(tmp_path / "node-c", storage_uri=uri).folder(path)


def test_time_to_live_and_user_metadata(tmp_path):
    uri = f"file://{tmp_path / 'bucket'}"
    store = CheckpointStore(tmp_path / "node-a", storage_uri=uri)
    before = datetime.now(UTC)
    kept = store.write("run-1", "training", "kept", write_text("k"), metadata={}, ttl_seconds=1,
                       user_metadata={"stage": "warmup"})
    assert kept.user_metadata == {"stage": "warmup"}
    assert before + timedelta(seconds=1) <= kept.expires_at <= datetime.now(UTC) + timedelta(seconds=1)
    doomed = store.write("run-1", "sampler", "doomed", write_text("d"), metadata={}, ttl_seconds=1).tinker_path
    forever = store.write("run-1", "sampler", "forever", write_text("f"), metadata={}).tinker_path
    reused = store.write("run-1", "training", "reused", write_text("old"), metadata={}, ttl_seconds=1).tinker_path
    assert store.set_ttl(kept.tinker_path, None).expires_at is None, "None removes the expiry"
    assert store.set_ttl(forever, 3600).expires_at > datetime.now(UTC) + timedelta(seconds=3500)
    elsewhere = CheckpointStore(tmp_path / "node-b", storage_uri=uri)
    assert {c.checkpoint_id: c.expires_at for c in elsewhere.list("run-1")}["weights/kept"] is None, "in the URI too"

    time.sleep(1.1)
    store.write("run-1", "training", "reused", write_text("new"), metadata={})  # expired: the name is free again
    assert (store.folder(reused) / "payload.txt").read_text() == "new" and store.metadata(reused)["expires_at"] is None
    with pytest.raises(ValueError, match=r"no checkpoint at .*doomed: it expired at .* and was removed"):
        store.folder(doomed)
    listed = {c.checkpoint_id: c for c in store.list("run-1")}
    assert listed.keys() == {"weights/kept", "sampler_weights/forever", "weights/reused"}
    assert listed["weights/kept"].user_metadata == {"stage": "warmup"}
    assert not (tmp_path / "bucket" / "run-1" / "sampler_weights" / "doomed").exists(), "removed from the URI too"
    assert not (tmp_path / "node-a" / "run-1" / "sampler_weights" / "doomed").exists()


def test_an_upload_without_its_checkpoint_json_is_no_checkpoint(tmp_path):
    uri = f"file://{tmp_path / 'bucket'}"
    CheckpointStore(tmp_path / "node-a", storage_uri=uri).write("run-1", "training", "a", write_text("x"),
                                                                 metadata={})
    (tmp_path / "bucket" / "run-1" / "weights" / "a" / "checkpoint.json").unlink()  # an upload cut short
    elsewhere = CheckpointStore(tmp_path / "node-b", storage_uri=uri)
    assert elsewhere.list("run-1") == []
    with pytest.raises(ValueError, match="no checkpoint at tinker://run-1/weights/a"):
        elsewhere.folder("tinker://run-1/weights/a")


SAVE_FOREVER = """
import sys
from rl.learner import Learner
from rl.types import AdamParams, Datum, ForwardBackwardInput, LoraConfig, ModelInput
model_dir, local, uri = sys.argv[1:]
learner = Learner(model_dir, storage=local, storage_uri=uri)
model_id = learner.create(model_dir, LoraConfig(rank=4, seed=0), model_id="run")
batch = ForwardBackwardInput(loss_fn="cross_entropy", data=[Datum(model_input=ModelInput.from_ints([1, 2, 3]),
                             loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]})])
for step in range(1, 10**6):
    learner.forward_backward(model_id, batch)
    learner.optim_step(model_id, AdamParams(learning_rate=1e-3))
    learner.save_weights(model_id, f"step-{step}")
    learner.save_weights(model_id, "latest", overwrite=True)
    print("saved", step, flush=True)
"""


def test_sigkill_while_saving_leaves_the_previous_checkpoint_loadable(tiny_model_dir, tmp_path):
    """A learner process is killed at random moments while it saves checkpoints in a loop; whatever it leaves
    loads, here and (from the storage URI) on a node with an empty local folder, with adapter, optimizer state
    and step from one and the same save."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    import torch

    from rl.learner import Learner

    uri = f"file://{tmp_path / 'bucket'}"
    killed_mid_write = False
    for attempt in range(4):
        local = tmp_path / f"node-{attempt}"
        process = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(tiny_model_dir), str(local), uri],
                                   stdout=subprocess.PIPE, text=True)
        while "saved 3" not in process.stdout.readline():
            assert process.poll() is None, "the saving process failed"
        time.sleep(random.uniform(0.05, 0.5))
        weights = local / "run" / "weights"
        deadline = time.monotonic() + 5  # then aim at a write: kill as soon as a staging folder shows
        while time.monotonic() < deadline and not any(path.name.startswith(".") for path in weights.iterdir()):
            pass
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        killed_mid_write |= any(path.name.startswith(".") for path in (local / "run" / "weights").iterdir())

        for root in (local, tmp_path / f"fresh-{attempt}"):  # this node's folder; an empty one and the URI
            learner = Learner(str(tiny_model_dir), storage=root, storage_uri=uri)
            store = learner.store
            paths = [checkpoint.tinker_path for checkpoint in store.list("run")]
            assert "tinker://run/weights/step-3" in paths
            newest = max(int(path.rsplit("-", 1)[1]) for path in paths if "/step-" in path)
            for path in [path for path in paths if path.endswith(("/latest", f"/step-{newest}"))]:
                learner.load_weights(path, optimizer=True, model_id=f"check-{len(learner._runs)}")
                optimizer_state = torch.load(store.folder(path) / "optimizer.pt", weights_only=True)["state"]
                assert {int(s["step"]) for s in optimizer_state.values()} == {store.metadata(path)["step"]}
        if killed_mid_write:
            print(f"a kill landed inside a write on try {attempt + 1}")
            break
    assert killed_mid_write, "no kill landed inside a write in 4 tries"

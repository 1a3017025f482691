"""The checkpoint store: atomic writes, listing, overwrite and delete."""

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
                                                                   "note": "one"}
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

"""Checkpoints: atomic, complete, and never able to run code when loaded."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from metarun.checkpoint import load_checkpoint, previous_path, save_checkpoint
from metarun.errors import CheckpointError


class _RunsCodeOnLoad:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_round_trip_keeps_tensors_and_plain_data(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    state = {"weights": {"w": torch.arange(6.0).reshape(2, 3)}, "iteration": 7, "config": "a: 1"}
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["weights"]["w"], state["weights"]["w"])
    assert loaded["iteration"] == 7 and loaded["config"] == "a: 1"
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "algorithm": _RunsCodeOnLoad(marker)}, path)
    # The payload is real: an unsafe load would run it.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_raw_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_RunsCodeOnLoad(marker)))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0, 10, 0.5])
def test_truncated_checkpoint_is_reported(tmp_path, keep):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"weights": torch.randn(1000)})
    data = path.read_bytes()
    size = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:size])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"something": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"iteration": 1})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint"):
        save_checkpoint(path, {"iteration": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_keep_previous_leaves_a_fallback(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"iteration": 1}, keep_previous=True)
    assert not previous_path(path).exists()
    save_checkpoint(path, {"iteration": 2}, keep_previous=True)
    assert load_checkpoint(path)["iteration"] == 2
    assert load_checkpoint(previous_path(path))["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-previous.pt", "last.pt"]


def test_real_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """A 1 MiB tmpfs really runs out of space; skipped where tmpfs can't be mounted."""
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        path = mount / "last.pt"
        save_checkpoint(path, {"weights": torch.zeros(1000)})
        with pytest.raises(CheckpointError, match="could not write"):
            save_checkpoint(path, {"weights": torch.zeros(1_000_000)})
        assert load_checkpoint(path)["weights"].shape == (1000,)
        assert [p.name for p in mount.iterdir()] == ["last.pt"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)

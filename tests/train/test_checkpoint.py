"""Checkpoints are written atomically and loaded with clear errors."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch

from ssm2d.train import CheckpointError, load_checkpoint, save_checkpoint
from ssm2d.train.io import remove_stale_temporaries, write_text_atomic


def _state(value: float) -> dict:
    return {"config": {"model": "m"}, "epoch": 1, "model": {"w": torch.full((3,), value)}}


def test_round_trip(tmp_path):
    path = save_checkpoint(_state(1.5), tmp_path / "sub" / "last.pt")
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], torch.full((3,), 1.5)) and state["epoch"] == 1
    assert sorted(os.listdir(path.parent)) == ["last.pt"]


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """A crash during the write (here: the rename raising) leaves the old checkpoint whole and no
    temporary file behind."""
    path = save_checkpoint(_state(1.0), tmp_path / "last.pt")
    before = path.read_bytes()

    def crash(src, dst):
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_text_is_written_atomically(tmp_path):
    path = write_text_atomic(tmp_path / "metrics.jsonl", "a\n")
    write_text_atomic(path, "b\n")
    assert path.read_text() == "b\n" and sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_usual_mode(tmp_path, umask):
    """0666 less the umask, as `open` gives (mkstemp's 0600 hid the runs from other users)."""
    old = os.umask(umask)
    try:
        paths = [write_text_atomic(tmp_path / "a.jsonl", "a\n"), save_checkpoint(_state(1.0), tmp_path / "last.pt")]
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [0o666 & ~umask] * 2


def test_a_failed_write_names_the_file(tmp_path, monkeypatch):
    """os.write raises ENOSPC without a file name; the error carries the target's, and no
    temporary is left."""

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as info:
        write_text_atomic(tmp_path / "metrics.jsonl", "a\n")
    monkeypatch.undo()
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(tmp_path / "metrics.jsonl"))
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_are_removed(tmp_path):
    stale = [tmp_path / ".last.pt.0a1b2c3d.tmp", tmp_path / ".config.yaml.99999999.tmp"]
    kept = [tmp_path / "last.pt", tmp_path / ".other.0a1b2c3d.tmp", tmp_path / "notes.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path, ("config.yaml", "last.pt", "best.pt"))
    assert sorted(removed) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in kept)
    assert remove_stale_temporaries(tmp_path / "missing", ("last.pt",)) == []


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="expected a file written by `ssm2d train` at .*missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .*corrupt.pt"):
        load_checkpoint(corrupt)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(save_checkpoint(_state(1.0), tmp_path / "whole.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read .*truncated.pt"):
        load_checkpoint(truncated)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not a checkpoint of `ssm2d train` \\(missing config, epoch, model\\)"):
        load_checkpoint(other)

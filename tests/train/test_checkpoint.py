"""Checkpoints are written atomically and loaded with clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from ssm2d.train import CheckpointError, load_checkpoint, save_checkpoint
from ssm2d.train.io import write_text_atomic


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

"""A run's folder is never lost or mixed, a resume keeps its schedule, and every failure of the
input or the environment is one line (while a bug keeps its traceback).

Runs train vit_mini_28 for an epoch or two on synthetic Fashion-MNIST files (12 steps of 50).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from run_files import DEMO, SMALL, make_learnable_idx, read_rows, subprocess_env

from ssm2d.cli import main
from ssm2d.errors import CheckpointError, ConfigError, DatasetError, NonFiniteLossError, Ssm2dError
from ssm2d.train import load_checkpoint, load_config, train
from ssm2d.train import trainer as trainer_module
from ssm2d.train.folder_lock import LOCK_NAME, folder_lock
from ssm2d.train.trainer import RUN_FILES

_EXISTING = "already holds a run"


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return ["--data-dir", str(make_learnable_idx(tmp_path_factory.mktemp("fashion_mnist")))]


def _train(out: Path, data_args: list[str], *extra: str, epochs: int = 1) -> None:
    main(["train", DEMO, "--epochs", str(epochs), *SMALL, *data_args, "--output", str(out), *extra])


def _error(out: Path, data_args: list[str], *extra: str, epochs: int = 1) -> str:
    """The one-line message of a `train` that must fail."""
    with pytest.raises(SystemExit) as info:
        _train(out, data_args, *extra, epochs=epochs)
    message = str(info.value)
    assert message.startswith("ssm2d train: error: ") and "\n" not in message, message
    return message


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """The run's files with their bytes and times; not the lock, which every attempt takes."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.name != LOCK_NAME}


def test_error_classes_keep_the_builtin_bases():
    """Code that caught the built-in classes before ssm2d.errors existed still catches them."""
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, Ssm2dError)
    assert issubclass(DatasetError, RuntimeError) and issubclass(DatasetError, Ssm2dError)
    assert issubclass(CheckpointError, RuntimeError) and issubclass(CheckpointError, Ssm2dError)
    assert issubclass(NonFiniteLossError, FloatingPointError) and issubclass(NonFiniteLossError, Ssm2dError)


def test_an_existing_run_is_refused_without_resume(tmp_path, data_args):
    out = tmp_path / "run"
    _train(out, data_args)
    before = _snapshot(out)
    expected = (
        f"ssm2d train: error: --output: {out} already holds a run (config.yaml, metrics.jsonl, last.pt, best.pt); "
        "pass --resume to continue it, or choose a fresh --output"
    )
    # Another model; a run that would fail early (it used to leave its config.yaml beside the old
    # checkpoints): both refused before anything is written.
    for extra in (["--model", "vit_mini_28_nope"], ["--lr", "1e6"]):
        assert _error(out, data_args, *extra) == expected
        assert _snapshot(out) == before
    # The library call refuses the same way.
    with pytest.raises(ConfigError, match=_EXISTING):
        train(load_config(DEMO, {"output": str(out), "data_dir": data_args[1]}))
    assert _snapshot(out) == before


@pytest.mark.parametrize("name", RUN_FILES)
def test_any_file_of_a_run_makes_a_run_folder(tmp_path, data_args, name):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_bytes(b"")
    (out / "notes.txt").write_text("a file of the user's")
    assert _EXISTING in _error(out, data_args)
    assert sorted(p.name for p in out.iterdir()) == sorted([name, "notes.txt"])


def test_output_naming_a_file_is_one_line(tmp_path, data_args):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    assert _error(out, data_args) == f"ssm2d train: error: --output: {out} is a file, expected a folder for the run's files"
    assert out.read_text() == "not a folder"


def test_resume_refuses_another_schedule(tmp_path, data_args):
    out = tmp_path / "run"
    _train(out, data_args, epochs=2)
    before = _snapshot(out)
    cases = [
        (3, [], "epochs: 2 -> 3"),
        (2, ["--lr", "1e-3"], "lr: 0.002 -> 0.001"),
        (2, ["--warmup-epochs", "1", "--min-lr", "0"], "min_lr: 1e-05 -> 0.0, warmup_epochs: 0.5 -> 1.0"),
        (2, ["--warmup-lr", "1e-4"], "warmup_lr: 1e-05 -> 0.0001"),
        (2, ["--batch-size", "40"], "batch_size: 50 -> 40, global_batch: 50 -> 40, steps_per_epoch: 12 -> 15"),
    ]
    for epochs, extra, pairs in cases:
        message = _error(out, data_args, "--resume", *extra, epochs=epochs)
        assert f"was trained with another schedule ({pairs}); " in message and "--allow-schedule-change" in message
        assert "a new --output" in message
        assert _snapshot(out) == before

    # The run as 2 processes of batch 25 would have recorded it, resumed by 1 process of batch 25.
    state = load_checkpoint(out / "last.pt")
    state["run"] = {"world_size": 2, "global_batch": 50, "steps_per_epoch": 12}
    state["config"]["batch_size"] = 25
    torch.save(state, out / "last.pt")
    message = _error(out, data_args, "--resume", "--batch-size", "25", epochs=2)
    assert "(world_size: 2 -> 1, global_batch: 50 -> 25, steps_per_epoch: 12 -> 24)" in message

    # Allowed: the new schedule continues from the same step and ends at min_lr.
    _train(out, data_args, "--resume", "--allow-schedule-change", epochs=3)
    rows = read_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["lr"] == pytest.approx(1e-5, rel=1e-6)
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 3 and state["updates"] == 36
    assert state["run"] == {"world_size": 1, "global_batch": 50, "steps_per_epoch": 12}
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["epochs"] == 3 and written["run"] == state["run"]


def test_a_recorded_best_always_has_its_file(tmp_path, data_args, monkeypatch):
    """A kill while best.pt is written never leaves a last.pt that records a best without its file."""
    out = tmp_path / "run"
    save = trainer_module.save_checkpoint

    def killed_at_best(state, path):
        if Path(path).name == "best.pt":
            raise KeyboardInterrupt("killed while writing best.pt")
        return save(state, path)

    monkeypatch.setattr(trainer_module, "save_checkpoint", killed_at_best)
    with pytest.raises(KeyboardInterrupt):
        _train(out, data_args)
    monkeypatch.undo()
    if (out / "last.pt").exists():
        recorded = load_checkpoint(out / "last.pt")["best"]["epoch"]
        assert recorded == 0 or load_checkpoint(out / "best.pt")["epoch"] == recorded, "a best without best.pt"
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "config.yaml"]


def test_resume_repairs_a_missing_best_from_last(tmp_path, data_args):
    out = tmp_path / "run"
    _train(out, data_args)
    (out / "best.pt").unlink()
    _train(out, data_args, "--resume")
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    assert best["epoch"] == last["epoch"] == last["best"]["epoch"] == 1 and "optimizer" not in best
    assert all(torch.equal(best["model"][k], v) for k, v in last["model"].items())


def test_a_full_disk_at_checkpoint_time_is_one_line(tmp_path, data_args, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell which file a write goes to")
    out = tmp_path / "run"
    write = os.write

    def full_disk(fd: int, data) -> int:
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    message = _error(out, data_args)
    monkeypatch.undo()
    assert message == f"ssm2d train: error: {out / 'last.pt'}: {os.strerror(errno.ENOSPC)}"
    assert not list(out.glob(".*.tmp")) and not (out / "last.pt").exists()


def test_a_read_only_location_is_one_line(tmp_path, data_args, monkeypatch):
    read_only = tmp_path / "mnt"
    out = read_only / "run"
    mkdir = os.mkdir

    def refuse(path, *args, **kwargs):  # os.mkdir as on a read-only mount (the tests may run as root)
        if Path(path).is_relative_to(read_only):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    message = _error(out, data_args)
    assert message in (f"ssm2d train: error: {p}: {os.strerror(errno.EROFS)}" for p in (out, read_only))


def test_a_library_bug_keeps_its_traceback(tmp_path, data_args, monkeypatch):
    """Only the package's errors and OS errors on a file are one line: anything else is a bug."""
    for bug in (ValueError("a bug"), TypeError("a bug"), RuntimeError("a bug"), OSError("a bug without a file")):

        def evaluate(*args, error=bug, **kwargs):
            raise error

        monkeypatch.setattr(trainer_module, "evaluate", evaluate)
        with pytest.raises(type(bug), match="a bug"):
            _train(tmp_path / type(bug).__name__, data_args)


@pytest.mark.parametrize("value", ["2.5", "0", "two"])
def test_a_bad_epoch_count_names_the_flag(value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--epochs", value])
    assert info.value.code == 2
    assert f"ssm2d train: error: argument --epochs: expected an integer >= 1, got '{value}'" in capsys.readouterr().err


def test_exit_code_and_stderr_of_a_one_line_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "ssm2d", "eval", "--checkpoint", str(tmp_path / "missing.pt")],
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("ssm2d eval: error: checkpoint: expected a file") and done.stderr.count("\n") == 1


def test_a_folder_in_use_is_refused_and_freed_when_its_process_dies(tmp_path, data_args):
    """A second writer of an --output in use gets one line naming the owner's pid, and changes
    nothing; the lock of a killed process is gone with it, though a child it forked (as a
    DataLoader worker is) still runs."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time; from ssm2d.train.folder_lock import folder_lock\n"
         "with folder_lock(sys.argv[1], '--output'):\n"
         "    child = os.fork()\n"
         "    if child == 0:\n        time.sleep(60); os._exit(0)\n"
         "    print(child, flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(),
    )  # fmt: skip
    child = int(holder.stdout.readline())
    try:
        message = _error(out, data_args)
        assert f"--output: {out} is in use by another ssm2d process (pid {holder.pid})" in message
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the fork lives on
        _train(out, data_args)  # the lock died with its process
        assert (out / "last.pt").is_file()
    finally:
        holder.kill()
        holder.wait()
        os.kill(child, signal.SIGKILL)


def test_a_lock_is_held_once_and_released_after_the_block(tmp_path):
    with folder_lock(tmp_path / "f", "--output"):
        assert (tmp_path / "f" / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(ConfigError, match=rf"--output: .* already in use by this process \(pid {os.getpid()}\)"):
            with folder_lock(tmp_path / "f", "--output"):
                pass
    with folder_lock(tmp_path / "f", "--output"):  # free again
        pass


def test_a_file_system_without_locks_writes_unguarded_with_one_warning(tmp_path, monkeypatch, caplog):
    """NFS and the like may refuse locks (ENOLCK): training goes on, with one warning per folder."""
    from ssm2d.train import folder_lock as lock_module

    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "lockf", refuse)
    for _ in range(2):
        with folder_lock(tmp_path / "nfs", "--output"):
            pass
    warnings = [r.getMessage() for r in caplog.records if "cannot lock" in r.getMessage()]
    assert warnings == [f"--output: cannot lock {tmp_path / 'nfs'} ([Errno {errno.ENOLCK}] No locks available); "
                        "nothing keeps a second process out of it"]  # fmt: skip

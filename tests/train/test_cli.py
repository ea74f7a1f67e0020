"""`ssm2d train | eval | kernels | compare` end to end on synthetic Fashion-MNIST files.

The tests write a learnable 10-class set of 28 x 28 images (tests/train/run_files.py). Each
run trains on a class-balanced half of its 1,200 training images (12 steps of 50) and
evaluates on its 200 test images.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
import yaml
from run_files import DEMO, N_VAL, SMALL, make_learnable_idx, read_rows, same_metrics, subprocess_env

from ssm2d.cli import main
from ssm2d.train import TrainConfig, load_checkpoint

ROW_KEYS = {"epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "lr", "epoch_seconds"}


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    """`--data-dir` of the synthetic Fashion-MNIST files."""
    return ["--data-dir", str(make_learnable_idx(tmp_path_factory.mktemp("fashion_mnist")))]


def test_train_eval_kernels(tmp_path, capsys, data_args):
    out = tmp_path / "run"
    out.mkdir()  # an existing empty folder is not a run: it is used
    main(["train", DEMO, "--model", "vit_mini_28_ssm2d", "--epochs", "2", *SMALL, *data_args, "--output", str(out)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(p.name for p in out.iterdir()) == [".lock", "best.pt", "config.yaml", "last.pt", "metrics.jsonl"]
    rows = read_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2] and all(ROW_KEYS <= r.keys() for r in rows)
    assert rows[-1]["val_acc1"] > 40, f"chance is 10 %: {rows}"
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert summary["best_acc1"] == max(r["val_acc1"] for r in rows)
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["run"] == {"world_size": 1, "global_batch": 50, "steps_per_epoch": 12}
    resolved = TrainConfig.from_dict(written)
    assert (resolved.model, resolved.epochs, resolved.train_fraction, resolved.batch_size) == (
        "vit_mini_28_ssm2d", 2, 0.5, 50)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask), f"umask {umask:o}: {modes}"
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == max(rows, key=lambda r: r["val_acc1"])["epoch"] and "optimizer" not in best

    main(["eval", "--checkpoint", str(out / "best.pt")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"acc1", "acc5", "loss"} <= result.keys() and result["samples"] == N_VAL
    assert result["acc1"] == pytest.approx(summary["best_acc1"], abs=1e-9)
    assert result["input_size"] == [1, 28, 28]

    # Another resolution: 32 x 32 gives an 8 x 8 patch grid; the kernels follow it.
    main(["eval", "--checkpoint", str(out / "last.pt"), "--img-size", "32"])
    other = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert other["input_size"] == [1, 32, 32] and math.isfinite(other["loss"]) and other["acc1"] > 20

    # A size the 4 x 4 patches do not tile: one line naming the flag, the patch size and valid sizes.
    with pytest.raises(SystemExit) as info:
        main(["eval", "--checkpoint", str(out / "last.pt"), "--img-size", "42"])
    assert str(info.value) == (
        "ssm2d eval: error: --img-size: 42 is not a multiple of the model's patch size 4x4; "
        "valid sizes are the multiples of 4, e.g. 40 or 44"
    )

    main(["kernels", "--checkpoint", str(out / "last.pt")])
    pngs = sorted((out / "kernels").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:02d}_blocks.{i}.norm1.spatial.png" for i in range(4)]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, data_args):
    """Every random source on: random crop, flip, MixUp/CutMix, RandomErasing, drop-path, and
    two data loader workers (their own seeds)."""
    random = ["--crop-padding", "2", "--hflip", "0.5", "--mixup", "0.8", "--cutmix", "1.0", "--re-prob", "0.25",
              "--drop-path", "0.1", "--workers", "2"]  # fmt: skip
    args = [DEMO, "--epochs", "3", *SMALL, *random, *data_args]
    # Both runs in a child with the same environment (one thread): a reduction over another
    # number of threads sums in another order and moves the losses by ~1e-5.
    whole = tmp_path / "whole"
    subprocess.run([sys.executable, "-m", "ssm2d", "train", *args, "--output", str(whole)], env=subprocess_env(),
                   check=True, capture_output=True)  # fmt: skip

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ssm2d", "train", *args, "--output", str(killed)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (killed / "metrics.jsonl").exists():
        assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "no epoch finished in 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(killed / "last.pt")["epoch"]
    assert 1 <= done < 3, f"killed after epoch {done}: the test needs a run stopped part-way"
    assert not list(killed.glob(".*.tmp")), "a temporary file was left behind"
    # What a kill during a write leaves: removed when the run is resumed.
    stale = [killed / ".last.pt.0badf00d.tmp", killed / ".metrics.jsonl.1234abcd.tmp"]
    for path in stale:
        path.write_bytes(b"partial")

    subprocess.run([*cmd, "--resume"], env=subprocess_env(), check=True, capture_output=True)
    same_metrics(read_rows(killed), read_rows(whole), rtol=1e-6)
    assert load_checkpoint(killed / "last.pt")["epoch"] == 3
    assert sorted(p.name for p in killed.iterdir()) == [".lock", "best.pt", "config.yaml", "last.pt", "metrics.jsonl"]


def test_ddp_two_processes_match_one(tmp_path, data_args):
    """torchrun, 2 CPU processes with gloo, batch 25 each = one process with batch 50: the same
    samples per step (DistributedSampler interleaves one permutation), gradients averaged."""
    args = [DEMO, "--epochs", "2", *SMALL, *data_args]
    single = tmp_path / "single"
    main(["train", *args, "--output", str(single)])
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ssm2d", "train", *args, "--batch-size", "25", "--output", str(ddp)]  # fmt: skip
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) on cpu" in done.stderr
    # Summation order differs (two half-batch means, then an all-reduce): losses agree to ~1e-4,
    # and a logit that close to a tie can flip one of the 200 predictions.
    same_metrics(read_rows(ddp), read_rows(single), rtol=5e-4, acc_atol=0.5)
    ddp_run = yaml.safe_load((ddp / "config.yaml").read_text())["run"]
    assert ddp_run == {"world_size": 2, "global_batch": 50, "steps_per_epoch": 12}
    assert load_checkpoint(ddp / "last.pt")["run"] == ddp_run
    assert sorted(p.name for p in ddp.iterdir()) == [".lock", "best.pt", "config.yaml", "last.pt", "metrics.jsonl"]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, data_args):
    out = tmp_path / "run"
    main(["train", DEMO, "--epochs", "1", *SMALL, *data_args, "--output", str(out)])
    before = (out / "last.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as info:
        main(["train", DEMO, "--epochs", "2", *SMALL, *data_args, "--lr", "1e30", "--resume", "--allow-schedule-change",
              "--output", str(out)])  # fmt: skip
    assert re.fullmatch(
        r"ssm2d train: error: training loss is (nan|inf) at epoch 2, step \d+ of 12; stopped before the update\. .*",
        str(info.value),
    ), str(info.value)
    assert ((out / "last.pt").read_bytes(), (out / "metrics.jsonl").read_text()) == before


def test_compare_writes_table_json_and_plot(tmp_path, capsys, data_args):
    out = tmp_path / "cmp"
    main(["compare", DEMO, "--models", "vit_mini_28,vit_mini_28_nope", "--seeds", "0,1", "--epochs", "1", *SMALL,
          *data_args, "--output", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| `vit_mini_28` |" in printed and "| `vit_mini_28_nope` |" in printed and " ± " in printed
    data = json.loads((out / "compare.json").read_text())
    assert data["command"].startswith(f"ssm2d compare {DEMO} --models vit_mini_28,vit_mini_28_nope --seeds 0,1")
    assert f"Command: `{data['command']}`" in (out / "compare.md").read_text()
    rows = {r["model"]: r for r in data["rows"]}
    assert set(rows) == {"vit_mini_28", "vit_mini_28_nope"} and rows["vit_mini_28"]["seeds"] == [0, 1]
    for model, row in rows.items():
        accs = [read_rows(out / model / f"seed{s}")[-1]["val_acc1"] for s in (0, 1)]
        assert row["val_acc1"] == pytest.approx(sum(accs) / 2)
        assert row["val_acc1_std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
        losses = [read_rows(out / model / f"seed{s}")[-1]["val_loss"] for s in (0, 1)]
        assert losses[0] != losses[1], "two seeds gave the same loss: the seed does not reach the run"
    assert rows["vit_mini_28"]["params"] > rows["vit_mini_28_nope"]["params"]  # the position embedding
    assert (out / "compare.md").read_text().count("\n| `") == 2
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--lerning-rate", "1"], "--lerning-rate: unknown option"),
        (["train", "--dataset", "mnist"], "mnist"),
        (["train", "--dataset", "fashion_mnist", "--data-dir", "{tmp}"], "{tmp}"),
        (["train", "--dataset", "fashion_mnist", "--data-dir", "{tmp}/file"],
         "data_dir: {tmp}/file is a file, expected a folder holding the fashion_mnist files"),
        (["train", "--dataset", "svhn"], "dataset: expected one of fashion_mnist"),
        (["train", DEMO, "{data}", "--model", "vit_mini_82"], "did you mean vit_mini_28"),
        (["train", DEMO, "{data}", "--model-kwargs", "{globl_pool: avg}", *SMALL, "--epochs", "1"], "globl_pool"),
        (["train", DEMO, "{data}", "--auto-augment", "bogus"], "auto_augment: expected"),
        (["eval", "--checkpoint", "{tmp}/missing.pt"], "expected a file written by `ssm2d train`"),
        (["eval", "--checkpoint", "{tmp}"], "expected a file written by `ssm2d train`"),
        (["kernels", "--checkpoint", "{tmp}/missing.pt"], "expected a file written by `ssm2d train`"),
    ],
)  # fmt: skip
def test_errors_are_one_clear_line(argv, message, tmp_path, data_args):
    (tmp_path / "file").write_text("not a folder")
    argv = [b for a in argv for b in (data_args if a == "{data}" else [a.replace("{tmp}", str(tmp_path))])]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--output", str(tmp_path / "out")] if argv[0] == "train" else argv)
    text = str(info.value)
    assert text.startswith(f"ssm2d {argv[0]}: error: ") and message.replace("{tmp}", str(tmp_path)) in text, text
    assert "\n" not in text.strip()


def test_checkpoint_model_matches_its_metrics(tmp_path, data_args):
    """The weights in last.pt are the ones that produced the last metrics row."""
    out = tmp_path / "run"
    main(["train", DEMO, "--epochs", "1", *SMALL, *data_args, "--output", str(out)])
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and state["history"] == read_rows(out)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

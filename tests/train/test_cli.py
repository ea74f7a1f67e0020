"""`ssm2d train | eval | kernels | compare` end to end on a small real subset of Fashion-MNIST.

Skipped with the reason when Fashion-MNIST is not installed (`apt-get install
dataset-fashion-mnist`). Each run trains on a class-balanced 1 % of the training set (600
images, 12 steps of 50) and evaluates on the full 10,000-image test set.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ssm2d.cli import main
from ssm2d.data import DatasetError, dataset_info
from ssm2d.train import TrainConfig, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo_cpu.yaml")
# A short deterministic recipe: no augmentation, 1 % of the data, batch 50.
SMALL = ["--train-fraction", "0.01", "--batch-size", "50", "--warmup-epochs", "0.5", "--workers", "0",
         "--crop-padding", "0", "--hflip", "0"]  # fmt: skip
ROW_KEYS = {"epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "lr", "epoch_seconds"}


def _fashion_mnist_or_skip() -> None:
    try:
        dataset_info("fashion_mnist")
    except DatasetError as err:
        pytest.skip(f"Fashion-MNIST is not installed here ({err})")


@pytest.fixture(scope="module", autouse=True)
def _needs_data() -> None:
    _fashion_mnist_or_skip()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same_metrics(a: list[dict], b: list[dict], rtol: float, acc_atol: float = 0.0) -> None:
    """Losses and learning rates within `rtol`; accuracies (%) within `acc_atol`."""
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "lr"):
            assert math.isclose(ra[key], rb[key], rel_tol=rtol, abs_tol=1e-9), f"epoch {ra['epoch']} {key}: {ra} vs {rb}"
        for key in ("val_acc1", "val_acc5"):
            assert abs(ra[key] - rb[key]) <= acc_atol + 1e-9, f"epoch {ra['epoch']} {key}: {ra} vs {rb}"


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}


def test_train_eval_kernels(tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", DEMO, "--model", "vit_mini_28_ssm2d", "--epochs", "2", *SMALL, "--output", str(out)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl"]
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2] and all(ROW_KEYS <= r.keys() for r in rows)
    assert rows[-1]["val_acc1"] > 40, f"chance is 10 %: {rows}"
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert summary["best_acc1"] == max(r["val_acc1"] for r in rows)
    resolved = TrainConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert (resolved.model, resolved.epochs, resolved.train_fraction, resolved.batch_size) == (
        "vit_mini_28_ssm2d", 2, 0.01, 50)
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == max(rows, key=lambda r: r["val_acc1"])["epoch"] and "optimizer" not in best

    main(["eval", "--checkpoint", str(out / "best.pt")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"acc1", "acc5", "loss"} <= result.keys() and result["samples"] == 10_000
    assert result["acc1"] == pytest.approx(summary["best_acc1"], abs=1e-9)
    assert result["input_size"] == [1, 28, 28]

    # Another resolution: 32 x 32 gives an 8 x 8 patch grid; the kernels follow it.
    main(["eval", "--checkpoint", str(out / "last.pt"), "--img-size", "32"])
    other = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert other["input_size"] == [1, 32, 32] and math.isfinite(other["loss"]) and other["acc1"] > 20

    main(["kernels", "--checkpoint", str(out / "last.pt")])
    pngs = sorted((out / "kernels").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:02d}_blocks.{i}.norm1.spatial.png" for i in range(4)]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path):
    args = [DEMO, "--epochs", "4", *SMALL]
    whole = tmp_path / "whole"
    main(["train", *args, "--output", str(whole)])

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ssm2d", "train", *args, "--output", str(killed)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (killed / "metrics.jsonl").exists():
        assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "no epoch finished in 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(killed / "last.pt")["epoch"]
    assert 1 <= done < 4, f"killed after epoch {done}: the test needs a run stopped part-way"
    assert not list(killed.glob(".*.tmp")), "a temporary file was left behind"

    subprocess.run([*cmd, "--resume"], env=_env(), check=True, capture_output=True)
    _same_metrics(_rows(killed), _rows(whole), rtol=1e-6)
    assert load_checkpoint(killed / "last.pt")["epoch"] == 4


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun, 2 CPU processes with gloo, batch 25 each = one process with batch 50: the same
    samples per step (DistributedSampler interleaves one permutation), gradients averaged."""
    args = [DEMO, "--epochs", "2", *SMALL]
    single = tmp_path / "single"
    main(["train", *args, "--output", str(single)])
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ssm2d", "train", *args, "--batch-size", "25", "--output", str(ddp)]  # fmt: skip
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) on cpu" in done.stderr
    # Summation order differs (two half-batch means, then an all-reduce): losses agree to ~1e-4,
    # and a logit that close to a tie can flip a few of the 10,000 predictions.
    _same_metrics(_rows(ddp), _rows(single), rtol=5e-4, acc_atol=0.05)
    assert sorted(p.name for p in ddp.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl"]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    main(["train", DEMO, "--epochs", "1", *SMALL, "--output", str(out)])
    before = (out / "last.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as info:
        main(["train", DEMO, "--epochs", "2", *SMALL, "--lr", "1e30", "--resume", "--output", str(out)])
    assert "ssm2d train: error: training loss is" in str(info.value) and "stopped before the update" in str(info.value)
    assert ((out / "last.pt").read_bytes(), (out / "metrics.jsonl").read_text()) == before


def test_compare_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    main(["compare", DEMO, "--models", "vit_mini_28,vit_mini_28_nope", "--seeds", "0,1", "--epochs", "1", *SMALL,
          "--output", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| `vit_mini_28` |" in printed and "| `vit_mini_28_nope` |" in printed and " ± " in printed
    data = json.loads((out / "compare.json").read_text())
    assert data["command"].startswith(f"ssm2d compare {DEMO} --models vit_mini_28,vit_mini_28_nope --seeds 0,1")
    assert f"Command: `{data['command']}`" in (out / "compare.md").read_text()
    rows = {r["model"]: r for r in data["rows"]}
    assert set(rows) == {"vit_mini_28", "vit_mini_28_nope"} and rows["vit_mini_28"]["seeds"] == [0, 1]
    for model, row in rows.items():
        accs = [_rows(out / model / f"seed{s}")[-1]["val_acc1"] for s in (0, 1)]
        assert row["val_acc1"] == pytest.approx(sum(accs) / 2)
        assert row["val_acc1_std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
        assert accs[0] != accs[1], "two seeds gave the same accuracy: the seed does not reach the run"
    assert rows["vit_mini_28"]["params"] > rows["vit_mini_28_nope"]["params"]  # the position embedding
    assert (out / "compare.md").read_text().count("\n| `") == 2
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--lerning-rate", "1"], "--lerning-rate: unknown option"),
        (["train", "--dataset", "mnist"], "mnist"),
        (["train", "--dataset", "fashion_mnist", "--data-dir", "{tmp}"], "{tmp}"),
        (["train", "--dataset", "svhn"], "dataset: expected one of fashion_mnist"),
        (["train", DEMO, "--model", "vit_mini_82"], "did you mean vit_mini_28"),
        (["train", DEMO, "--model-kwargs", "{globl_pool: avg}", *SMALL, "--epochs", "1"], "globl_pool"),
        (["eval", "--checkpoint", "{tmp}/missing.pt"], "expected a file written by `ssm2d train`"),
    ],
)
def test_errors_are_one_clear_line(argv, message, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--output", str(tmp_path / "out")] if argv[0] == "train" else argv)
    text = str(info.value)
    assert text.startswith(f"ssm2d {argv[0]}: error: ") and message.replace("{tmp}", str(tmp_path)) in text, text
    assert "\n" not in text.strip()


def test_checkpoint_model_matches_its_metrics(tmp_path):
    """The weights in last.pt are the ones that produced the last metrics row."""
    out = tmp_path / "run"
    main(["train", DEMO, "--epochs", "1", *SMALL, "--output", str(out)])
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and state["history"] == _rows(out)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

"""Distributed training on the CPU: a non-finite loss on one process stops every process with the
same message, and the process group has a timeout (the config key dist_timeout_minutes)."""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ssm2d.errors import NonFiniteLossError
from ssm2d.train import TrainConfig, train, train_one_epoch
from ssm2d.train import distributed as distributed_module
from ssm2d.train import trainer as trainer_module
from ssm2d.train.distributed import init_distributed

WORLD = 2
STEPS = 3
BAD = (1, 2)  # (rank, step): the only place a NaN enters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, folder: str) -> None:
    """One process: 3 steps of a DDP-wrapped linear model; a NaN input on rank 1 at step 2."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    env = init_distributed("cpu", timeout_minutes=1.0)  # a process left waiting fails within a minute
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(4, 3))
    batches = []
    for step in range(1, STEPS + 1):
        images = torch.randn(5, 4)
        if (env.rank, step) == BAD:
            images[0, 0] = float("nan")
        batches.append((images, torch.randint(0, 3, (5,))))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        train_one_epoch(model, batches, STEPS, nn.CrossEntropyLoss(), optimizer, lambda: None, env.device, epoch=3)
        outcome = "finished"
    except NonFiniteLossError as err:
        outcome = str(err)
    finally:
        dist.destroy_process_group()
    Path(folder, f"rank{rank}.txt").write_text(outcome)


@pytest.mark.slow  # two processes that each import torch and timm: 10-40 s
def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_one_message(tmp_path):
    context = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the processes did not finish: one waits for the other"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert messages[0] == messages[1], messages
    assert messages[0].startswith(
        "training loss is not finite on 1 of 2 processes at epoch 3, step 2 of 3; stopped before the update"
    ), messages[0]


def test_the_process_group_gets_the_configured_timeout(monkeypatch):
    seen = {}

    def init_process_group(**kwargs):
        seen.update(kwargs)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed_module.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed_module.dist, "init_process_group", init_process_group)
    env = init_distributed("cpu", timeout_minutes=7.5)
    assert (env.rank, env.world_size) == (1, 2)
    assert seen == dict(backend="gloo", rank=1, world_size=2, timeout=timedelta(minutes=7.5))


def test_train_passes_dist_timeout_minutes(monkeypatch, tmp_path):
    assert TrainConfig().dist_timeout_minutes == 30.0
    seen = []

    class Stop(Exception):
        pass

    def init(device: str, timeout_minutes: float):
        seen.append(timeout_minutes)
        raise Stop

    monkeypatch.setattr(trainer_module, "init_distributed", init)
    with pytest.raises(Stop):
        train(TrainConfig(dataset="fashion_mnist", dist_timeout_minutes=12.0, output=str(tmp_path / "run")))
    assert seen == [12.0]
    with pytest.raises(ValueError, match="dist_timeout_minutes: expected a number > 0, got 0"):
        TrainConfig(dist_timeout_minutes=0)

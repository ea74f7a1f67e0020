"""Timing in alternation, shared by the model benchmarks: each function timed in turn within
every repetition, so that all of them see the same machine state."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import ssm2d

__all__ = ["alternate", "alternate_runs", "infer_fn", "train_step_fn"]


def train_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.AdamW(ssm2d.param_groups(model, weight_decay=0.05), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def infer_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def infer() -> None:
        with torch.no_grad():
            model(x)

    return infer


def alternate_runs(fns: list[Callable[[], None]], reps: int, warmup: int = 2) -> list[list[float]]:
    """Seconds of each function in every repetition, the functions timed in turn within each."""
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(warmup + reps):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            if rep >= warmup:
                out.append(time.perf_counter() - start)
    return times


def alternate(fns: list[Callable[[], None]], reps: int, warmup: int = 2) -> list[float]:
    """Median ms of each function, timed in turn within every repetition."""
    return [1e3 * statistics.median(t) for t in alternate_runs(fns, reps, warmup)]

"""The study's fair cost column: the training step of every arm's model, timed side by side.

The runs of a study train one after another on a machine that may be busy (other jobs, a paused
process), so their wall time per epoch (`epoch_seconds`) is a rough cost at best. A timing pass
times the training step alone (forward, backward and optimizer step on one synthetic batch; no
data loading, no evaluation) of several models in alternating rounds, each model right after the
reference model, so that a slow minute of the machine falls on both sides of every ratio.

study.json keeps the entries in its "timing" object: what they were measured under (method, batch
size, threads, rounds, steps, warm-up, the reference model) and, per timing key, the step time and its
ratio to the reference's. Entries measured otherwise are replaced, never mixed.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data import build_dataset, class_balanced_subset, dataset_info
from ..optim import param_groups
from .config import ConfigError, TrainConfig
from .distributed import DistEnv, resolve_device
from .engine import train_one_epoch
from .study_config import StudyPlan, setting_slug
from .trainer import build_loss, build_model, model_args, train_sampler

__all__ = [
    "DEFAULT_TIMING", "QUICK_TIMING", "STEP_KEYS", "TIMING_METHOD", "TimingSettings", "measured_alike",
    "merged_timing",
    "time_training_steps", "timed_configs", "timing_header", "timing_key", "timing_of", "timing_pass",
    "timing_reference", "train_steps_per_epoch",
]  # fmt: skip

log = logging.getLogger("ssm2d.study")

# The config keys that change the cost of a training step; an arm's setting of any of them makes
# its own timing entry (e.g. `vit_mini_28_ssm2d [state_dim=64]`). train_fraction, lr, seed... do not.
STEP_KEYS = ("model_kwargs", "batch_size", "img_size", "drop_path", "mixup", "cutmix", "clip_grad", "amp", "device")


@dataclass(frozen=True)
class TimingSettings:
    """How a timing pass measures: after `warmup` untimed steps of every model, `rounds` rounds
    that each time `steps` consecutive steps of every model in turn.

    7 rounds by default: with 3, on 2 cores of a VM, `vit_mini_28_ssm2d` and `_ssm2d_nope` (whose
    steps differ by a position-embedding add) came out at 1.29x and 1.42x the reference."""

    rounds: int = 7
    steps: int = 5
    warmup: int = 2

    def __post_init__(self) -> None:
        for name, low in (("rounds", 1), ("steps", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


DEFAULT_TIMING = TimingSettings()
# --quick: a smoke test of the machinery. The warm-up step keeps first-call costs (numba compiles,
# allocations) out of the one timed step.
QUICK_TIMING = TimingSettings(rounds=1, steps=1, warmup=1)


def timing_key(model: str, settings: Mapping[str, Any]) -> str:
    """The name of an arm's timing entry: the model, plus its settings of `STEP_KEYS`, as in the
    arm labels: "vit_mini_28_ssm2d [variant=complex]"; "vit_mini_28" for a train_fraction arm."""
    slug = setting_slug({k: v for k, v in settings.items() if k in STEP_KEYS})
    return f"{model} [{slug}]" if slug else model


def _step_runner(cfg: TrainConfig, seed: int) -> Callable[[int], None]:
    """A function that trains `cfg.model` for n steps on one synthetic batch, as the trainer would.

    The model (initialized from `cfg.seed`, without pretrained weights), AdamW over the library's
    parameter groups, the loss (label smoothing, MixUp/CutMix) and the step itself
    (`train_one_epoch`: forward, loss, backward, gradient clipping, optimizer step) are the
    trainer's. The batch is `cfg.batch_size` random images of the data set's (C, H, W) and random
    labels of its classes, drawn from `seed`; the learning-rate schedule is left out.
    """
    info = dataset_info(cfg.dataset, cfg.data_dir, img_size=cfg.img_size)  # the shape and classes only
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, model_args(cfg, info)).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.spatial_lr), lr=cfg.lr)
    criterion, mixup = build_loss(cfg, info.num_classes)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(cfg.batch_size, info.in_chans, *info.img_size, generator=generator).to(device)  # (B, C, H, W)
    targets = torch.randint(info.num_classes, (cfg.batch_size,), generator=generator).to(device)  # (B,)

    def run(steps: int) -> None:
        # train_one_epoch ends on a .item() of the summed loss, which waits for every queued kernel.
        train_one_epoch(model, [(images, targets)] * steps, steps, criterion, optimizer, lambda: None, device,
                        mixup=mixup, amp=cfg.amp, clip_grad=cfg.clip_grad)  # fmt: skip

    return run


def time_training_steps(
    configs: Mapping[str, TrainConfig], reference: str, settings: TimingSettings = DEFAULT_TIMING, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Time the training step of every config's model, side by side, and relate it to `reference`'s.

    Every model is built and warmed up first (`settings.warmup` steps each, untimed); then each of
    `settings.rounds` rounds times, for every other model in turn, `settings.steps` consecutive
    steps of the reference and then as many of the model. A model's ratio is the median over
    rounds of its mean step time over the reference's just before it: the machine's speed drifts
    from minute to minute (on the 2-core VM of docs/benchmarks.md by up to 1.6x), but little
    within the seconds between the two. Its step time is that ratio times the reference's fastest
    mean step time in the pass. All models stay in memory for the whole pass.

    Args:
        configs: name -> the resolved config of a run of the model (its model, model_kwargs,
            data set shape, batch_size, optimizer and loss settings are used; its data is not read).
        reference: the name in `configs` whose step time is the ratios' unit.
        settings: rounds, steps per round and warm-up steps.
        seed: seed of the synthetic batches (each model's weights come from its config's seed).

    Returns:
        name -> {"step_seconds": the step time in seconds (one optimizer step on a batch of the
        config's batch_size), "ratio": the step time over the reference's (1.0 for the
        reference)}, in the order of `configs`.

    Raises:
        ValueError: `reference` is not a name of `configs`.
    """
    if reference not in configs:
        raise ValueError(f"reference: expected one of the timed models {', '.join(configs)}, got {reference!r}")
    log.info(
        "timing %d models: %d rounds of %d steps each after %d warm-up steps, %d threads",
        len(configs), settings.rounds, settings.steps, settings.warmup, torch.get_num_threads(),
    )  # fmt: skip
    runners = {name: _step_runner(cfg, seed) for name, cfg in configs.items()}
    torch.manual_seed(seed)  # drop-path and dropout draws
    if settings.warmup:
        for run in runners.values():
            run(settings.warmup)
    def seconds_per_step(name: str) -> float:
        start = time.perf_counter()
        runners[name](settings.steps)
        return (time.perf_counter() - start) / settings.steps

    fastest = math.inf  # the reference's fastest mean step, seconds
    ratios: dict[str, list[float]] = {name: [] for name in runners if name != reference}
    for _ in range(settings.rounds):
        for name in ratios:
            before = seconds_per_step(reference)
            fastest = min(fastest, before)
            ratios[name].append(seconds_per_step(name) / before)
    if not ratios:  # the reference alone
        fastest = min(seconds_per_step(reference) for _ in range(settings.rounds))
    ratio = {name: 1.0 if name == reference else statistics.median(ratios[name]) for name in runners}
    result = {name: {"step_seconds": fastest * ratio[name], "ratio": ratio[name]} for name in runners}
    for name, entry in result.items():
        log.info("timing: %s: %.4f s per step, %.2f x %s", name, entry["step_seconds"], entry["ratio"], reference)
    return result


def train_steps_per_epoch(cfg: TrainConfig) -> int:
    """The optimizer steps of one epoch of `cfg` on one process, by the trainer's rule: the
    class-balanced `train_fraction` subset of the training split, through the trainer's sampler,
    in batches of `batch_size` with the last partial batch dropped (e.g. 117 for Fashion-MNIST's
    60,000 images at train_fraction 0.25 and batch 128). Reads the data set's labels."""
    info = dataset_info(cfg.dataset, cfg.data_dir, img_size=cfg.img_size)
    train_set = build_dataset(info, "train")
    if cfg.train_fraction < 1:
        train_set = class_balanced_subset(train_set, cfg.train_fraction, cfg.seed)
    one = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return len(DataLoader(train_set, cfg.batch_size, sampler=train_sampler(cfg, train_set, one), drop_last=True))


def timing_of(payload: dict[str, Any], path: Path, source: str) -> dict[str, Any] | None:
    """The "timing" object of a study.json; None before its first timing pass (or from an older ssm2d)."""
    timing = payload.get("timing")
    if timing is not None and not (isinstance(timing, dict) and isinstance(timing.get("models"), dict)):
        raise ConfigError(f"{source}: {path}: timing: expected an object with a 'models' mapping, got {timing!r}")
    return timing


# What a timing object's entries were measured under; entries measured otherwise are not mixed.
_TIMING_HEADER = ("method", "batch_size", "threads", "rounds", "steps", "warmup", "reference")
# The measuring method of `time_training_steps`: each model's ratio to the reference timed just
# before it, median over rounds. (Entries of the first method, each model's fastest round on its
# own, carry no "method" and are timed again.)
TIMING_METHOD = "adjacent-reference ratio, median over rounds"


def _first_run_config(plan: StudyPlan, experiment: str, arm: str) -> TrainConfig:
    """The resolved config of an arm's first planned run (its seeds differ in nothing timed)."""
    run_id = next(iter(plan.arm_runs[(experiment, arm)].values()))
    return plan.runs[run_id].config


def timing_reference(plan: StudyPlan) -> tuple[str, TrainConfig]:
    """The timing unit: the first arm of the first experiment (its key and first run's config)."""
    exp = plan.experiments[0]
    arm = exp.arms[0]
    return timing_key(arm.model, arm.settings), _first_run_config(plan, exp.name, arm.label)


def timing_header(plan: StudyPlan, settings: TimingSettings) -> dict[str, Any]:
    reference, config = timing_reference(plan)
    return {"method": TIMING_METHOD, "batch_size": config.batch_size, "threads": torch.get_num_threads(),
            "rounds": settings.rounds, "steps": settings.steps, "warmup": settings.warmup, "reference": reference}


def measured_alike(timing: dict[str, Any] | None, header: dict[str, Any]) -> bool:
    """Whether `timing`'s entries were measured as `header` says (same batch, threads, rounds...)."""
    return timing is not None and all(timing.get(k) == header[k] for k in _TIMING_HEADER)


def merged_timing(old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any] | None:
    """`new` plus the entries of `old` it lacks, when both were measured alike; else `new` alone."""
    if old is None or new is None:
        return new or old
    if not measured_alike(old, new):
        log.warning("timing: the entries of %s were measured otherwise; replaced by those of %s",
                    {k: old.get(k) for k in _TIMING_HEADER}, {k: new[k] for k in _TIMING_HEADER})  # fmt: skip
        return new
    return {**new, "models": {**old["models"], **new["models"]}}


def timed_configs(plan: StudyPlan, selected: set[str], models: list[str] | None) -> dict[str, TrainConfig]:
    """Timing key -> the config of the arm's first run, for the arms of the `selected` experiments
    (and of `models`, if given)."""
    configs: dict[str, TrainConfig] = {}
    for exp in plan.experiments:
        for arm in exp.arms:
            if exp.name in selected and (models is None or arm.model in models):
                configs.setdefault(timing_key(arm.model, arm.settings), _first_run_config(plan, exp.name, arm.label))
    return configs


def timing_pass(
    plan: StudyPlan, configs: dict[str, TrainConfig], timing: dict[str, Any] | None, settings: TimingSettings,
    command: str | None,
) -> dict[str, Any] | None:
    """Time `configs` beside the reference and merge their entries into `timing`. The reference's
    own entry is written only when it is in `configs` or has none measured alike: an entry's ratio
    is always to the reference's step time in the entry's own pass."""
    if not configs:
        log.info("study: no arm to time")
        return timing
    header = timing_header(plan, settings)
    reference, reference_config = timing_reference(plan)
    measured = time_training_steps({reference: reference_config, **configs}, reference, settings)
    reference_kept = measured_alike(timing, header) and reference in timing["models"]
    keep = set(configs) | (set() if reference_kept else {reference})
    new = {**header, "command": command, "models": {k: v for k, v in measured.items() if k in keep}}
    return merged_timing(timing, new)

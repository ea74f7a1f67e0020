"""`ssm2d train`: build data, model and recipe from a `TrainConfig`, train, evaluate, checkpoint.

A run's folder holds `config.yaml` (the resolved config, and under `run:` the world size, global
batch and steps per epoch), `metrics.jsonl` (one object per evaluated epoch), `last.pt` (after
every epoch) and `best.pt` (best validation top-1). Every file is written atomically by process 0
only, best.pt before the last.pt that records it. A folder holding any of these files is a run:
only `--resume` continues it, and only with the schedule it was trained with (unless
`allow_schedule_change`). Each epoch reseeds every random generator (torch, numpy, random, the
data loader's workers, MixUp) from (seed, epoch, rank), so a run resumed from `last.pt` continues
exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import is_model, model_entrypoint
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..data import DatasetInfo, build_dataset, build_transform, class_balanced_subset, dataset_info
from ..models import create_model
from ..optim import param_groups
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RUN_RECORD_KEY, ConfigError, TrainConfig
from .distributed import DistEnv, ShardSampler, init_distributed
from .engine import evaluate, train_one_epoch
from .folder_lock import folder_lock
from .io import remove_stale_temporaries, write_text_atomic

__all__ = ["build_loss", "build_model", "train", "train_sampler"]

log = logging.getLogger("ssm2d.train")

# The files of a run's folder; a folder holding any of them is an existing run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt")
# Keys that must agree between a checkpoint and the run resuming from it.
_RESUME_KEYS = ("model", "model_kwargs", "dataset", "img_size", "train_fraction", "seed", "repeated_aug")
# What defines the learning-rate schedule and the data per step: these config keys, and the facts
# of the run in `_Run.run_record` (world size, global batch, steps per epoch). A resume that
# changes any of them needs `allow_schedule_change`.
_SCHEDULE_KEYS = ("epochs", "lr", "min_lr", "warmup_epochs", "warmup_lr", "batch_size")


def model_args(cfg: TrainConfig, info: DatasetInfo) -> dict[str, Any]:
    """Keyword arguments for `create_model`: the data set's classes, channels and size."""
    args = dict(
        num_classes=info.num_classes, in_chans=info.in_chans, img_size=tuple(info.img_size), drop_path_rate=cfg.drop_path
    )
    return {**args, **cfg.model_kwargs}


def pretrained_args(cfg: TrainConfig) -> dict[str, Any]:
    """`create_model`'s weight arguments for a run's start (not kept in the checkpoint's model_args)."""
    if cfg.pretrained_file is not None:
        return {"pretrained_file": cfg.pretrained_file}
    return {"pretrained": True} if cfg.pretrained else {}


# Model families (the module of timm's entrypoint, last part) whose models are built for one
# input size and take `img_size`: the transformers and scans. Convolutional families take none.
_SIZED_FAMILIES = frozenset(
    {"vit", "vision_transformer", "deit", "swin", "swin_transformer", "spvit", "vim", "v2m", "mega", "vmamba"}
)


def build_model(name: str, args: dict[str, Any]) -> nn.Module:
    """`create_model(name, **args)`, without `img_size` for a family that takes none (ConvNeXt).

    Raises:
        ConfigError: `name` is not a model, or the model class does not take a keyword of `args`.
    """
    family = model_entrypoint(name).__module__.rsplit(".", 1)[-1] if is_model(name) else ""
    if family not in _SIZED_FAMILIES:
        args = {k: v for k, v in args.items() if k != "img_size"}
    try:
        return create_model(name, **args)
    except TypeError as err:  # a model_kwargs key the model class does not take
        if "keyword argument" not in str(err):
            raise
        raise ConfigError(f"model_kwargs: {name}: {err}") from err


def check_run_folder(out: Path, resume: bool) -> None:
    """Refuse an `--output` that is a file, or that already holds a run when not resuming.

    An existing folder holding none of `RUN_FILES` (e.g. an empty one) is fine. Writes nothing.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output: {out} is a file, expected a folder for the run's files")
    present = [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []
    if present and not resume:
        raise ConfigError(
            f"--output: {out} already holds a run ({', '.join(present)}); pass --resume to continue it, "
            "or choose a fresh --output"
        )


def _seed_everything(seed: int, epoch: int, rank: int) -> int:
    """Seed torch, numpy and random for one epoch of one process; returns the seed used."""
    value = (seed * 1_000_003 + epoch * 9_973 + rank * 101) % 2**31
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    return value


def train_sampler(cfg: TrainConfig, dataset: Dataset, env: DistEnv) -> Sampler:
    """The training sampler of one process: timm's repeated-augmentation sampler when
    `cfg.repeated_aug` > 1, else a shuffling `DistributedSampler`."""
    if cfg.repeated_aug > 1:
        # selected_round=0: keep every sample's repeats (timm's default rounds to 256 samples,
        # which drops small subsets entirely).
        return RepeatAugSampler(
            dataset, num_replicas=env.world_size, rank=env.rank, num_repeats=cfg.repeated_aug, selected_round=0
        )
    return DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True)


def build_loss(cfg: TrainConfig, num_classes: int) -> tuple[Callable, Mixup | None]:
    """The training loss and the batch mixer of `cfg`: soft-target cross-entropy with timm's
    MixUp/CutMix (label smoothing folded into the soft targets) when either is on, else
    cross-entropy with label smoothing, or plain; the mixer is None without MixUp/CutMix."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
            label_smoothing=cfg.label_smoothing, num_classes=num_classes,
        )  # fmt: skip
        return SoftTargetCrossEntropy(), mixup
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.label_smoothing), None
    return nn.CrossEntropyLoss(), None


class _Run:
    """The state of one training run, on one process."""

    def __init__(self, cfg: TrainConfig, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.output)
        self.info = dataset_info(cfg.dataset, cfg.data_dir, img_size=cfg.img_size)
        crop = dict(crop_padding=cfg.crop_padding, hflip=cfg.hflip, auto_augment=cfg.auto_augment, re_prob=cfg.re_prob)
        train_set = build_dataset(self.info, "train", build_transform(self.info, True, cfg.img_size, **crop))
        if cfg.train_fraction < 1:
            train_set = class_balanced_subset(train_set, cfg.train_fraction, cfg.seed)
        val_set = build_dataset(self.info, "val", build_transform(self.info, False, cfg.img_size))
        if cfg.val_fraction < 1:
            val_set = class_balanced_subset(val_set, cfg.val_fraction, 0)
        global_batch = cfg.batch_size * env.world_size
        if len(train_set) < global_batch:
            raise ConfigError(
                f"batch_size: {cfg.batch_size} x {env.world_size} processes is more than the {len(train_set)} "
                "training samples; lower --batch-size or raise --train-fraction"
            )
        mixing = cfg.mixup > 0 or cfg.cutmix > 0
        if mixing and cfg.batch_size % 2:
            raise ConfigError(f"batch_size: MixUp/CutMix mix pairs of samples, expected an even size, got {cfg.batch_size}")
        self.sampler = train_sampler(cfg, train_set, env)
        self.generator = torch.Generator()
        loader = dict(num_workers=cfg.workers, pin_memory=env.device.type == "cuda", persistent_workers=False)
        self.train_loader = DataLoader(
            train_set, cfg.batch_size, sampler=self.sampler, drop_last=True, generator=self.generator, **loader
        )
        self.val_loader = DataLoader(
            val_set, cfg.val_batch_size or 2 * cfg.batch_size, sampler=ShardSampler(val_set, env.rank, env.world_size),
            **loader,
        )  # fmt: skip
        self.steps = len(self.train_loader)
        self.val_steps = len(self.val_loader)
        self.run_record = {"world_size": env.world_size, "global_batch": global_batch, "steps_per_epoch": self.steps}

        torch.manual_seed(cfg.seed)
        self.model_args = model_args(cfg, self.info)
        self.model = build_model(cfg.model, {**self.model_args, **pretrained_args(cfg)}).to(env.device)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay, cfg.spatial_lr), lr=cfg.lr)
        total = cfg.epochs * self.steps
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=total, lr_min=cfg.min_lr, warmup_t=round(cfg.warmup_epochs * self.steps),
            warmup_lr_init=cfg.warmup_lr, t_in_epochs=False,
        )  # fmt: skip
        self.updates = 0
        self.criterion, self.mixup = build_loss(cfg, self.info.num_classes)
        self.train_model: nn.Module = self.model
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        self.epoch = 0
        self.best = {"acc1": -1.0, "epoch": 0}
        self.history: list[dict[str, Any]] = []

    def step(self) -> None:
        self.updates += 1
        self.scheduler.step_update(self.updates)

    def state(self, with_optimizer: bool) -> dict[str, Any]:
        state = {
            "config": self.cfg.to_dict(), "epoch": self.epoch, "model": self.model.state_dict(),
            "model_args": self.model_args, "classes": list(self.info.classes), "best": self.best,
            "history": self.history, "updates": self.updates, "run": self.run_record,
        }  # fmt: skip
        if with_optimizer:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def schedule(self) -> dict[str, Any]:
        """What defines this run's schedule: `_SCHEDULE_KEYS` of the config and the run record."""
        return {**{k: getattr(self.cfg, k) for k in _SCHEDULE_KEYS}, **self.run_record}

    def resume(self, path: Path, allow_schedule_change: bool) -> dict[str, Any]:
        """Continue from the checkpoint at `path` after checking its settings; returns it."""
        state = load_checkpoint(path)
        differ = [k for k in _RESUME_KEYS if state["config"].get(k) != getattr(self.cfg, k)]
        if differ:
            pairs = ", ".join(f"{k}: {state['config'].get(k)!r} -> {getattr(self.cfg, k)!r}" for k in differ)
            raise ConfigError(f"--resume: {path} was trained with other settings ({pairs}); use a new --output")
        # A checkpoint of an older ssm2d lacks the run record: its keys are not checked.
        recorded = {**{k: state["config"].get(k) for k in _SCHEDULE_KEYS}, **state.get("run", {})}
        changed = [(k, recorded[k], v) for k, v in self.schedule().items() if k in recorded and recorded[k] != v]
        if changed:
            pairs = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed)
            if not allow_schedule_change:
                raise ConfigError(
                    f"--resume: {path} was trained with another schedule ({pairs}); resume with the same "
                    "settings and number of processes, pass --allow-schedule-change to continue on the new "
                    "schedule from the same step, or use a new --output"
                )
            log.warning("--allow-schedule-change: resuming %s on a new schedule (%s)", path, pairs)
        if state["epoch"] > self.cfg.epochs:
            raise ConfigError(f"epochs: {path} has already trained {state['epoch']} epochs, more than {self.cfg.epochs}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.best, self.history = state["epoch"], state["best"], state["history"]
        self.updates = state["updates"]
        self.scheduler.step_update(self.updates)
        log.info("resumed from %s after epoch %d", path, self.epoch)
        return state

    def repair_best(self, state: dict[str, Any]) -> None:
        """Write best.pt from a resumed `state` (last.pt) when that was the best epoch and best.pt
        is missing (a run killed between the two writes by an older ssm2d, or a deleted file)."""
        best = self.out / "best.pt"
        if best.exists() or state["best"]["epoch"] == 0:  # nothing evaluated yet
            return
        if state["best"]["epoch"] == state["epoch"]:
            save_checkpoint({k: v for k, v in state.items() if k != "optimizer"}, best)
            log.warning("%s was missing; written again from last.pt (epoch %d, the best)", best, state["epoch"])
        else:
            log.warning(
                "%s is missing and last.pt is not the best epoch (%d): best.pt comes back when an epoch beats it",
                best, state["best"]["epoch"],
            )  # fmt: skip

    def write(self, improved: bool) -> None:
        """best.pt (if improved), then last.pt, which records it, then metrics.jsonl from the
        checkpointed history: each atomic, so a kill between two never leaves a recorded best
        without its file."""
        if improved:
            save_checkpoint(self.state(with_optimizer=False), self.out / "best.pt")
        save_checkpoint(self.state(with_optimizer=True), self.out / "last.pt")
        write_text_atomic(self.out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in self.history))

    def run_epoch(self) -> dict[str, Any] | None:
        cfg, env = self.cfg, self.env
        start = time.perf_counter()
        self.generator.manual_seed(_seed_everything(cfg.seed, self.epoch, env.rank))
        # Both samplers seed their shuffle from the epoch alone: fold the run's seed into it.
        self.sampler.set_epoch(cfg.seed * 100_003 + self.epoch)
        show = env.is_main and sys.stderr.isatty()
        desc = f"epoch {self.epoch + 1}/{cfg.epochs}"
        train_loss = train_one_epoch(
            self.train_model, self.train_loader, self.steps, self.criterion, self.optimizer, self.step, env.device,
            mixup=self.mixup, amp=cfg.amp, clip_grad=cfg.clip_grad, show_progress=show, desc=desc,
            epoch=self.epoch + 1,
        )  # fmt: skip
        self.epoch += 1
        if self.epoch % cfg.eval_every and self.epoch != cfg.epochs:
            if env.is_main:
                save_checkpoint(self.state(with_optimizer=True), self.out / "last.pt")
            return None
        val = evaluate(self.model, self.val_loader, self.val_steps, env.device, amp=cfg.amp, show_progress=show)
        row = {
            "epoch": self.epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_acc1": val["acc1"],
            "val_acc5": val["acc5"], "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - start,
        }  # fmt: skip
        self.history.append(row)
        improved = val["acc1"] > self.best["acc1"]
        if improved:
            self.best = {"acc1": val["acc1"], "epoch": self.epoch}
        if env.is_main:
            self.write(improved)
        return row


def train(cfg: TrainConfig, resume: bool = False, allow_schedule_change: bool = False) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.dataset` as `cfg` says; returns a summary of the run.

    Args:
        cfg: the resolved configuration.
        resume: continue from `cfg.output/last.pt` if it exists (its settings must match).
            Without it, a `cfg.output` that already holds a run is refused.
        allow_schedule_change: on resume, accept another world size, global batch, epochs, lr or
            warm-up / min lr than the checkpoint's: the new schedule continues from the same step.

    Raises:
        ConfigError: a bad setting, `cfg.output` holds a run and `resume` is off, another process
            trains into `cfg.output` (`folder_lock`), or the resumed checkpoint was trained with
            other settings. Raised before any of the run's files is written (the folder's lock
            file may be, by a main process that took the lock).
        NonFiniteLossError: the loss became NaN or infinite; `last.pt` keeps the last good epoch.
        OSError: the run's folder cannot be written (read-only, full disk); the error names the file.
    """
    check_run_folder(Path(cfg.output), resume)
    env = init_distributed(cfg.device, cfg.dist_timeout_minutes)
    # the main process writes the folder, and holds its lock while it trains
    with folder_lock(cfg.output, "--output") if env.is_main else contextlib.nullcontext():
        return _train(cfg, env, resume, allow_schedule_change)


def _train(cfg: TrainConfig, env: DistEnv, resume: bool, allow_schedule_change: bool) -> dict[str, Any]:
    """`train` after the checks, the process group and the folder's lock."""
    run = _Run(cfg, env)
    last = run.out / "last.pt"
    state = None
    if resume and last.is_file():
        state = run.resume(last, allow_schedule_change)
    elif resume:
        log.info("--resume: no %s yet; starting from scratch", last)
    if env.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        for tmp in remove_stale_temporaries(run.out, RUN_FILES):
            log.info("removed %s, left by a run killed while writing", tmp)
        if state is not None:
            run.repair_best(state)
        record = {**cfg.to_dict(), RUN_RECORD_KEY: run.run_record}
        write_text_atomic(run.out / "config.yaml", yaml.safe_dump(record, sort_keys=False))
    log.info(
        "%s on %s: %d parameters, %d steps per epoch, %d process(es) on %s",
        cfg.model, cfg.dataset, run.params, run.steps, env.world_size, env.device,
    )  # fmt: skip
    while run.epoch < cfg.epochs:
        row = run.run_epoch()
        if row is not None:
            log.info(
                "epoch %d/%d: train_loss %.4f val_loss %.4f val_acc1 %.2f (%.1f s)",
                row["epoch"], cfg.epochs, row["train_loss"], row["val_loss"], row["val_acc1"], row["epoch_seconds"],
            )  # fmt: skip
    final = run.history[-1] if run.history else {}
    return {
        "model": cfg.model, "params": run.params, "output": str(run.out), "epochs": cfg.epochs,
        "best_acc1": run.best["acc1"], "best_epoch": run.best["epoch"], "final": final, "history": run.history,
        "config": dataclasses.asdict(cfg),
    }  # fmt: skip

"""The training configuration: one typed dataclass, read from YAML and overridden by `--key value`.

Every run writes its resolved configuration to `DIR/config.yaml`, and a checkpoint carries it, so
that `ssm2d eval` and `--resume` rebuild exactly what was trained.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data import DATASETS
from ..errors import ConfigError

__all__ = ["RUN_RECORD_KEY", "ConfigError", "TrainConfig", "load_config", "parse_override"]

# The mapping a run adds to its config.yaml (world size, global batch, steps per epoch): a record
# of the run, not a setting; reading a config.yaml back ignores it.
RUN_RECORD_KEY = "run"


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults are the paper's small-data recipe (docs/math.md §7).

    Args:
        model: a registered model name (`ssm2d.list_models()` or any timm name).
        model_kwargs: extra keyword arguments for the model class, e.g. {"global_pool": "avg"}.
        dataset: one of `ssm2d.data.DATASETS`.
        data_dir: the folder holding the data set (None: the data set's default location).
        img_size: input size fed to the model (None: the data set's native size).
        pretrained: start from the published timm weights of the model's base (DeiT), from the
            local Hugging Face cache; the spatial layers start at identity.
        pretrained_file: start from this weights file of the model's base timm model
            (.safetensors, or a .pth / .bin state dict); implies `pretrained`.
        epochs, batch_size: per-process batch size; the global batch is batch_size x processes.
        lr, min_lr, warmup_epochs, warmup_lr, weight_decay: AdamW with linear warm-up and a
            cosine decay to min_lr, stepped every iteration.
        spatial_lr: peak learning rate of the spatial layers' parameters (the new ones when
            fine-tuning a pretrained model); None: lr. The schedule scales both alike.
        label_smoothing, mixup, cutmix, mixup_prob, mixup_switch_prob: timm's Mixup/CutMix
            (alphas; 0 turns each off).
        crop_padding, hflip, auto_augment, re_prob: augmentation (RandomCrop padding, flip
            probability, AutoAugment policy, RandomErasing probability).
        repeated_aug: repeats of each sample per epoch (repeated augmentation; 1 = off).
        drop_path: stochastic depth rate.
        clip_grad: max gradient norm (None: no clipping).
        train_fraction: a class-balanced subset of the training set, for sample-efficiency studies.
        val_fraction: a class-balanced subset of the validation set (the same one for every seed),
            for smoke tests.
        val_batch_size: evaluation batch size (None: 2 x batch_size).
        eval_every: evaluate every this many epochs (and always after the last).
        workers: data loader worker processes per training process.
        amp: "auto" (bf16 autocast on CUDA, none on CPU), "bf16" or "none".
        device: "auto", "cpu" or "cuda".
        dist_timeout_minutes: under torchrun, a collective that waits longer than this (a process
            died or hangs) fails instead of waiting for ever.
        seed: seeds the model's initialization, the data order and every augmentation.
        output: the run's folder (config.yaml, metrics.jsonl, last.pt, best.pt).
    """

    model: str = "vit_sd_32_ssm2d"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "cifar100"
    data_dir: str | None = None
    img_size: int | None = None
    pretrained: bool = False
    pretrained_file: str | None = None
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    spatial_lr: float | None = None
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    crop_padding: int = 4
    hflip: float = 0.5
    auto_augment: str | None = "cifar10"
    re_prob: float = 0.25
    repeated_aug: int = 3
    drop_path: float = 0.1
    clip_grad: float | None = None
    train_fraction: float = 1.0
    val_fraction: float = 1.0
    val_batch_size: int | None = None
    eval_every: int = 1
    workers: int = 2
    amp: str = "auto"
    device: str = "auto"
    dist_timeout_minutes: float = 30.0
    seed: int = 0
    output: str = "outputs/run"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field that is out of range."""
        checks = [
            ("dataset", self.dataset in DATASETS, f"one of {', '.join(DATASETS)}"),
            ("epochs", self.epochs >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("lr", self.lr > 0, "a number > 0"),
            ("min_lr", self.min_lr >= 0, "a number >= 0"),
            ("warmup_epochs", 0 <= self.warmup_epochs <= self.epochs, f"a number in [0, epochs={self.epochs}] (set --warmup-epochs)"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("spatial_lr", self.spatial_lr is None or self.spatial_lr > 0, "a number > 0 or null"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "a number in [0, 1)"),
            ("mixup", self.mixup >= 0, "a number >= 0 (0 turns MixUp off)"),
            ("cutmix", self.cutmix >= 0, "a number >= 0 (0 turns CutMix off)"),
            ("mixup_prob", 0 <= self.mixup_prob <= 1, "a probability in [0, 1]"),
            ("mixup_switch_prob", 0 <= self.mixup_switch_prob <= 1, "a probability in [0, 1]"),
            ("crop_padding", self.crop_padding >= 0, "an integer >= 0"),
            ("hflip", 0 <= self.hflip <= 1, "a probability in [0, 1]"),
            ("re_prob", 0 <= self.re_prob <= 1, "a probability in [0, 1]"),
            ("repeated_aug", self.repeated_aug >= 1, "an integer >= 1 (1 turns it off)"),
            ("drop_path", 0 <= self.drop_path < 1, "a number in [0, 1)"),
            ("clip_grad", self.clip_grad is None or self.clip_grad > 0, "a number > 0 or null"),
            ("train_fraction", 0 < self.train_fraction <= 1, "a fraction in (0, 1]"),
            ("val_fraction", 0 < self.val_fraction <= 1, "a fraction in (0, 1]"),
            ("val_batch_size", self.val_batch_size is None or self.val_batch_size >= 1, "an integer >= 1 or null"),
            ("img_size", self.img_size is None or self.img_size >= 1, "an integer >= 1 or null"),
            ("eval_every", self.eval_every >= 1, "an integer >= 1"),
            ("workers", self.workers >= 0, "an integer >= 0"),
            ("amp", self.amp in ("auto", "bf16", "none"), "one of 'auto', 'bf16', 'none'"),
            ("device", self.device in ("auto", "cpu", "cuda"), "one of 'auto', 'cpu', 'cuda'"),
            ("dist_timeout_minutes", self.dist_timeout_minutes > 0, "a number > 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping, checking names, types and ranges; `source` names it in errors.

        A `run` mapping (the record a run adds to its config.yaml) is ignored.
        """
        return cls(**_checked(_without_run_record(values), source))


def _without_run_record(values: Any) -> Any:
    """`values` without the `RUN_RECORD_KEY` mapping of a run's config.yaml."""
    if isinstance(values, dict) and isinstance(values.get(RUN_RECORD_KEY), dict):
        return {k: v for k, v in values.items() if k != RUN_RECORD_KEY}
    return values


def _checked(values: Any, source: str) -> dict[str, Any]:
    """`values` with every key a TrainConfig field and every value of the field's type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(values).__name__}")
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        hints = [f"{k} (did you mean {', '.join(m)}?)" if (m := difflib.get_close_matches(k, fields, 2)) else k
                 for k in unknown]  # fmt: skip
        raise ConfigError(f"{source}: unknown keys {', '.join(hints)}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(TrainConfig)
    return {k: _coerce(k, v, hints[k], source) for k, v in values.items()}


def _coerce(name: str, value: Any, annotation: Any, source: str) -> Any:
    """Check `value` against the field's annotation; ints are accepted where floats are expected."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for option in options:
        if option is type(None) and value is None:
            return None
        origin = typing.get_origin(option) or option
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool, dict) and isinstance(value, origin):
            return value
    expected = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{source}: {name}: expected {expected}, got {value!r}")


def parse_override(name: str, text: str) -> Any:
    """The value of a command-line `--name text` for the field `name`, by the field's type.

    "null" / "none" give None where allowed; numbers are read as Python reads them (so "1e-3"
    is a float, which YAML 1.1 would read as a string); a dict field takes YAML/JSON text.
    """
    hints = typing.get_type_hints(TrainConfig)
    if name not in hints:
        close = difflib.get_close_matches(name, hints, 2)
        hint = f" (did you mean {', '.join('--' + c.replace('_', '-') for c in close)}?)" if close else ""
        valid = ", ".join("--" + k.replace("_", "-") for k in hints)
        raise ConfigError(f"--{name.replace('_', '-')}: unknown option{hint}; valid options: {valid}")
    annotation = hints[name]
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if type(None) in options and text.lower() in ("null", "none"):
        return None
    for option in options:
        origin = typing.get_origin(option) or option
        try:
            if origin is int:
                return int(text)
            if origin is float:
                return float(text)
        except ValueError:
            continue
        if origin is bool and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.lower() in ("true", "1", "yes")
        if origin is dict:
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ConfigError(f"--{name.replace('_', '-')}: expected a YAML/JSON mapping, got {text!r}") from err
        if origin is str:
            return text
    return text  # wrong type: TrainConfig.from_dict names the field and the expected type


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The YAML file at `path` (if any), then `overrides` on top.

    Keys and types are checked per source (the file is named in its errors); ranges, some of
    which relate two keys (warm-up within the epochs), are checked on the result.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: expected a YAML file at {path}, found none")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config: {path} is not valid YAML: {err}") from err
        values.update(_checked(_without_run_record(loaded or {}), str(path)))
    values.update(_checked(overrides or {}, "overrides"))
    return TrainConfig(**values)

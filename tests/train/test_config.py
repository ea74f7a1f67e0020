"""TrainConfig: YAML + overrides, typed, with errors that list what is valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ssm2d.train import ConfigError, TrainConfig, load_config, parse_override

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# Every training config; study.yaml is a study file (tests/train/test_study.py loads it).
TRAIN_CONFIGS = [p for p in sorted(CONFIGS.glob("*.yaml")) if p.name != "study.yaml"]


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    for key, value in raw.items():
        assert getattr(cfg, key) == value, key


def test_paper_recipe_is_the_default():
    """Spec section 8: AdamW lr 1e-3 wd 0.05, 100 epochs, 10 warm-up, cosine to 1e-6, batch 128,
    label smoothing 0.1, stochastic depth 0.1, crop pad 4, flip, AutoAugment, MixUp/CutMix,
    RandomErasing 0.25, repeated augmentation x3."""
    cfg = TrainConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.epochs, cfg.warmup_epochs, cfg.min_lr, cfg.batch_size) == (
        1e-3, 0.05, 100, 10.0, 1e-6, 128)
    assert (cfg.label_smoothing, cfg.drop_path, cfg.crop_padding, cfg.hflip, cfg.re_prob, cfg.repeated_aug) == (
        0.1, 0.1, 4, 0.5, 0.25, 3)
    assert cfg.auto_augment == "cifar10" and cfg.mixup > 0 and cfg.cutmix > 0
    assert load_config(CONFIGS / "small_data.yaml").to_dict() == {**TrainConfig().to_dict(), **yaml.safe_load(
        (CONFIGS / "small_data.yaml").read_text())}


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: vit_mini_28\nepochs: 3\nwarmup_epochs: 1\nlr: 0.01\n")
    cfg = load_config(path, {"lr": 0.5, "seed": 7})
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.seed) == ("vit_mini_28", 3, 0.5, 7)


def test_unknown_keys_are_listed_with_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlearning_rate: 0.1\nbatchsize: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "learning_rate" in msg and "batchsize" in msg
    assert "did you mean batch_size" in msg
    assert "valid keys: model, model_kwargs, dataset" in msg and "warmup_epochs" in msg


def test_override_unknown_key():
    with pytest.raises(ConfigError, match=r"--warmup-epoch: unknown option \(did you mean --warmup-epochs"):
        parse_override("warmup_epoch", "3")


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ({"epochs": "ten"}, r"epochs: expected int, got 'ten'"),
        ({"epochs": 2.5}, r"epochs: expected int, got 2.5"),
        ({"lr": True}, r"lr: expected float, got True"),
        ({"epochs": 0}, r"epochs: expected an integer >= 1, got 0"),
        ({"dataset": "imagenet"}, r"dataset: expected one of fashion_mnist, mnist, cifar10, cifar100, imagefolder"),
        ({"train_fraction": 1.5}, r"train_fraction: expected a fraction in \(0, 1\], got 1.5"),
        ({"amp": "fp16"}, r"amp: expected one of 'auto', 'bf16', 'none', got 'fp16'"),
        ({"epochs": 5, "warmup_epochs": 10}, r"warmup_epochs: expected a number in \[0, epochs=5\] \(set --warmup-epochs\), got 10.0"),
        ({"model_kwargs": [1]}, r"model_kwargs: expected dict, got \[1\]"),
    ],
)
def test_bad_values_name_the_key(values, pattern):
    with pytest.raises(ConfigError, match=pattern):
        TrainConfig.from_dict(values)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="expected a YAML file at"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of config keys, got list"):
        load_config(listy)


def test_a_runs_config_yaml_reads_back(tmp_path):
    """A run's config.yaml adds a `run:` record (world size, global batch, steps per epoch),
    which reading the file back as a config ignores; any other unknown key is still refused."""
    cfg = TrainConfig(epochs=17, lr=3e-4, dist_timeout_minutes=5)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**cfg.to_dict(), "run": {"world_size": 2, "global_batch": 256}}))
    assert load_config(path) == cfg
    assert TrainConfig.from_dict(yaml.safe_load(path.read_text())) == cfg
    path.write_text(yaml.safe_dump({**cfg.to_dict(), "run": 3}))
    with pytest.raises(ConfigError, match="unknown keys run"):
        load_config(path)


def test_parse_override_types():
    assert parse_override("lr", "1e-3") == 1e-3  # YAML 1.1 would read this as a string
    assert parse_override("epochs", "12") == 12
    assert parse_override("img_size", "none") is None and parse_override("img_size", "40") == 40
    assert parse_override("auto_augment", "null") is None
    assert parse_override("auto_augment", "rand-m9-mstd0.5") == "rand-m9-mstd0.5"
    assert parse_override("model_kwargs", "{global_pool: avg}") == {"global_pool": "avg"}
    assert parse_override("epochs", "ten") == "ten"  # then rejected by TrainConfig, naming the key

"""Command line: `ssm2d train | eval | compare | kernels` (also `python -m ssm2d`, and under torchrun).

`train` and `compare` read a YAML config (see `configs/`) and take any config key as a
`--key-name value` override on top of it; `ssm2d train --help` lists the common ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import ctypes
import ctypes.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .data import DatasetError
from .layers import SSM2D
from .train import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    TrainConfig,
    compare,
    evaluate_checkpoint,
    load_config,
    load_trained_model,
    parse_override,
    shutdown_distributed,
    train,
)
from .viz import layer_kernel_panels, model_kernel_panels, save_kernel_heatmaps

# Errors that mean "the input was wrong": reported in one line, without a traceback (unless
# SSM2D_TRACEBACK=1). ValueError and TypeError come from bad model names and model_kwargs.
_USER_ERRORS = (ConfigError, DatasetError, CheckpointError, NonFiniteLossError, FileNotFoundError, ValueError, TypeError)

# Config keys with their own documented flag; every other config key is accepted as --key-name.
_TRAIN_FLAGS = ("model", "dataset", "data_dir", "epochs", "batch_size", "lr", "train_fraction", "seed", "output")
_OTHER_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _TRAIN_FLAGS)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _tune_allocator() -> None:
    """Keep freed memory in glibc's heap instead of returning it to the OS after every step.

    Training allocates and frees the same large buffers every step; with glibc's defaults each
    one is a fresh mmap whose pages fault in again. Measured: the 2-D SSM layer's step 30-50 %
    faster on CPU with these settings; re-measured for issue 18, `vit_sd_32_ssm2d`'s training
    step at batch 64 (1 thread, separate processes in alternation, medians of 10 steps) took
    2.0 and 4.1 s with them against 4.8 and 4.6 s without (1.1-2.4x). A process-level setting,
    so it lives in the CLI only.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 512 * 2**20)
    libc.mallopt(m_trim_threshold, 1024 * 2**20)


def _overrides(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """The config keys given on the command line: the documented flags, and `--key-name value`
    for every other key of TrainConfig (parsed by the key's type)."""
    unknown = [token for token in extra if token.startswith("-")]
    if unknown:
        name = unknown[0].lstrip("-").partition("=")[0].replace("-", "_")
        parse_override(name, "")  # raises ConfigError: unknown option, with the valid ones
    if extra:
        raise ConfigError(f"unexpected arguments {' '.join(extra)}: expected one config file and --key value pairs")
    values = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k, None) is not None}
    for name in _OTHER_KEYS:
        text = getattr(args, name, None)
        if text is not None:
            values[name] = parse_override(name, text)
    return values


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", stream=sys.stderr)


def _train(args: argparse.Namespace, extra: list[str]) -> None:
    cfg = load_config(args.config, _overrides(args, extra))
    summary = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        final = summary["final"]
        print(json.dumps({"output": summary["output"], "best_acc1": summary["best_acc1"], **final}))


def _compare(args: argparse.Namespace, extra: list[str]) -> None:
    cfg = load_config(args.config, _overrides(args, extra))
    models = [m for m in args.models.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    is_main = int(os.environ.get("RANK", "0")) == 0
    command = "ssm2d " + " ".join(args.argv)
    result = compare(cfg, models, seeds, resume=args.resume, is_main=is_main, command=command)
    if is_main:
        print(result["table"], end="")
        print(f"wrote {Path(cfg.output) / 'compare.md'}, compare.json and compare.png")


def _eval(args: argparse.Namespace, extra: list[str]) -> None:
    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
    result = evaluate_checkpoint(
        args.checkpoint, dataset=args.dataset, data_dir=args.data_dir, img_size=args.img_size,
        batch_size=args.batch_size, workers=args.workers, device=args.device,
    )  # fmt: skip
    print(json.dumps(result))


def _kernels(args: argparse.Namespace, extra: list[str]) -> None:
    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
    if args.init:
        torch.manual_seed(args.seed)
        layer = SSM2D(args.dim, state_dim=args.state_dim, directions=args.directions, variant=args.variant)
        grid = (args.grid[0], args.grid[1])
        title = f"SSM2D at initialization ({args.variant}, N={args.state_dim}, seed {args.seed}), grid {grid[0]}x{grid[1]}"
        output = args.output or "kernels_init.png"
        path = save_kernel_heatmaps(layer_kernel_panels(layer, grid), output, channels=args.channels, title=title)
        print(f"wrote {path}")
        return
    model, state = load_trained_model(args.checkpoint)
    size = tuple(state["model_args"]["img_size"]) if isinstance(state["model_args"]["img_size"], (list, tuple)) else (
        state["model_args"]["img_size"],) * 2  # fmt: skip
    input_size = (state["model_args"]["in_chans"], *size)
    out = Path(args.output) if args.output else Path(args.checkpoint).parent / "kernels"
    name = state["config"]["model"]
    for i, (module, panels) in enumerate(model_kernel_panels(model, input_size).items()):
        grid = tuple(panels["folded"].shape[-2:])
        title = f"{name}, epoch {state['epoch']}: {module} on a {(grid[0] + 1) // 2}x{(grid[1] + 1) // 2} grid"
        path = save_kernel_heatmaps(panels, out / f"{i:02d}_{module}.png", channels=args.channels, title=title)
        print(f"wrote {path}")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (configs/*.yaml); flags override it")
    p.add_argument("--model", help="a registered model name (ssm2d.list_models())")
    p.add_argument("--dataset", help="fashion_mnist, mnist, cifar10, cifar100 or imagefolder")
    p.add_argument("--data-dir", help="folder holding the data set (default: its usual place)")
    p.add_argument("--epochs", type=_positive)
    p.add_argument("--batch-size", type=_positive, help="per process")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--train-fraction", type=float, help="class-balanced subset of the training set, in (0, 1]")
    p.add_argument("--seed", type=int)
    p.add_argument("--output", help="folder for config.yaml, metrics.jsonl, last.pt, best.pt")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt when it exists")
    for name in _OTHER_KEYS:  # the rest of TrainConfig, read by the key's type in _overrides
        p.add_argument("--" + name.replace("_", "-"), dest=name, metavar="VALUE", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssm2d", description="2-D spatial layers for vision models.")
    sub = parser.add_subparsers(dest="command", required=True)
    more = "Any other config key is accepted as --key-name value (see TrainConfig in ssm2d/train/config.py)."

    t = sub.add_parser("train", help="train a model", epilog=more, allow_abbrev=False)
    _add_train_flags(t)
    t.set_defaults(func=_train)

    c = sub.add_parser(
        "compare", help="train several models with one recipe and tabulate them", epilog=more, allow_abbrev=False
    )
    _add_train_flags(c)
    c.add_argument("--models", required=True, help="comma-separated model names")
    c.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    c.set_defaults(func=_compare)

    e = sub.add_parser("eval", help="evaluate a checkpoint; the last line is JSON with acc1, acc5, loss")
    e.add_argument("--checkpoint", required=True, help="last.pt or best.pt of `ssm2d train`")
    e.add_argument("--dataset", help="default: the training data set")
    e.add_argument("--data-dir")
    e.add_argument("--img-size", type=_positive, help="input size (default: the training size)")
    e.add_argument("--batch-size", type=_positive, default=256)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    e.set_defaults(func=_eval)

    k = sub.add_parser("kernels", help="write PNG heat maps of 2-D SSM kernels")
    source = k.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="every 2-D SSM layer of a trained model (one PNG per layer)")
    source.add_argument("--init", action="store_true", help="a freshly initialized layer")
    k.add_argument("--dim", type=_positive, default=192, help="--init: channels (default 192)")
    k.add_argument("--state-dim", type=_positive, default=16, help="--init: states N (default 16)")
    k.add_argument("--directions", type=int, choices=(1, 2, 4), default=4, help="--init")
    k.add_argument("--variant", choices=("real", "complex"), default="real", help="--init")
    k.add_argument("--grid", type=_positive, nargs=2, default=(14, 14), metavar=("H", "W"), help="--init")
    k.add_argument("--channels", type=_positive, default=6, help="channels to show (default 6)")
    k.add_argument("--seed", type=int, default=0, help="--init")
    k.add_argument("--output", help="PNG file (--init) or folder (--checkpoint; default: CHECKPOINT_DIR/kernels)")
    k.set_defaults(func=_kernels)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    _setup_logging()
    _tune_allocator()
    try:
        args.func(args, extra)
    except _USER_ERRORS as err:
        if os.environ.get("SSM2D_TRACEBACK") == "1":
            raise
        sys.exit(f"ssm2d {args.command}: error: {err}")
    finally:
        shutdown_distributed()

"""Command line: `ssm2d train | eval | compare | study | kernels | export | predict` (also `python -m ssm2d`, torchrun).

`train` and `compare` read a YAML config (see `configs/`) and take any config key as a
`--key-name value` override on top of it; `ssm2d train --help` lists the common ones.

Errors of the input or the environment (the package's `Ssm2dError`s, and OS errors on a file:
read-only folder, full disk) are reported as one line, `ssm2d COMMAND: error: ...`, on stderr
with exit code 1 (command-line syntax errors: argparse's message and exit code 2). Any other
exception is a bug and keeps its traceback; SSM2D_TRACEBACK=1 shows the traceback of all.
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
import tempfile
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, Ssm2dError
from .layers import SSM2D
from .train import (
    TrainConfig,
    compare,
    evaluate_checkpoint,
    load_config,
    load_trained_model,
    parse_override,
    shutdown_distributed,
    train,
)
from .train.study import run_study, time_study
from .train.study_config import load_study
from .train.study_report import render_results
from .viz import layer_kernel_panels, model_kernel_panels, save_kernel_heatmaps

# Config keys with their own documented flag; every other config key is accepted as --key-name.
_TRAIN_FLAGS = ("model", "dataset", "data_dir", "epochs", "batch_size", "lr", "train_fraction", "seed", "output")
_OTHER_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _TRAIN_FLAGS)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _one_line(err: BaseException) -> str | None:
    """The one-line report of an error of the input or the environment; None for a bug."""
    if isinstance(err, Ssm2dError):
        return str(err)
    if isinstance(err, OSError) and err.filename is not None:  # a file or folder the command uses
        return f"{err.filename}: {err.strerror or err}"
    return None


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
    summary = train(cfg, resume=args.resume, allow_schedule_change=args.allow_schedule_change)
    if int(os.environ.get("RANK", "0")) == 0:
        final = summary["final"]
        print(json.dumps({"output": summary["output"], "best_acc1": summary["best_acc1"], **final}))


def _compare(args: argparse.Namespace, extra: list[str]) -> None:
    cfg = load_config(args.config, _overrides(args, extra))
    models = [m for m in args.models.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    is_main = int(os.environ.get("RANK", "0")) == 0
    command = "ssm2d " + " ".join(args.argv)
    result = compare(
        cfg, models, seeds, resume=args.resume, allow_schedule_change=args.allow_schedule_change, is_main=is_main,
        command=command,
    )  # fmt: skip
    if is_main:
        print(result["table"], end="")
        print(f"wrote {Path(cfg.output) / 'compare.md'}, compare.json and compare.png")


def _study(args: argparse.Namespace, extra: list[str]) -> None:
    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
    if args.output is None and not args.quick:
        raise ConfigError("--output: expected the study's folder (only --quick defaults to a temporary one)")
    if args.timing and args.render_only:
        raise ConfigError("--timing: it times the models into OUTPUT/study.json; it does not go with --render-only")
    if args.seeds and (args.timing or args.render_only):
        raise ConfigError("--seeds: it selects the runs to train; --timing and --render-only train nothing")
    output = Path(args.output or tempfile.mkdtemp(prefix="ssm2d_study_quick_"))
    # --quick is a smoke test: its report goes next to its runs, never into docs/ or README.md.
    docs = output / "docs" if args.quick else Path(args.docs)
    readme = None if args.quick or not Path(args.readme).is_file() else Path(args.readme)
    if args.render_only:
        payload = json.loads(Path(args.resume_from or output / "study.json").read_text())
    else:
        plan = load_study(args.config, quick=args.quick)
        command = "ssm2d " + " ".join(args.argv)
        if args.timing:
            payload = time_study(plan, output, only=args.only, models=args.models, resume_from=args.resume_from,
                                 command=command)  # fmt: skip
        else:
            payload = run_study(plan, output, only=args.only, models=args.models, seeds=args.seeds,
                                resume_from=args.resume_from, command=command)  # fmt: skip
    path = render_results(payload, docs, readme)
    written = [] if args.render_only else [str(output / "study.json")]  # --render-only only reads it
    print(f"wrote {', '.join([*written, str(path)])}, {docs / 'results.json'} and {docs / 'img'}/"
          + (f"; updated {readme}" if readme else ""))


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


def _export(args: argparse.Namespace, extra: list[str]) -> None:
    from .deploy import export_checkpoint

    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
    result = export_checkpoint(
        args.checkpoint, args.output, img_size=args.img_size, fmt=args.format, batch=args.check_batch,
        tolerance=args.tolerance, opset=args.opset,
    )  # fmt: skip
    size = "x".join(map(str, result.input_size))
    print(f"wrote {result.path} ({result.format}, input (B, {size}))")
    print(f"max |exported - PyTorch| on a random batch of {args.check_batch}: {result.max_abs_diff:.3g} "
          f"(tolerance {result.tolerance:g})")  # fmt: skip


def _predict(args: argparse.Namespace, extra: list[str]) -> None:
    from .deploy import format_predictions, predict_images

    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
    results = predict_images(args.checkpoint, args.images, topk=args.topk, onnx=args.onnx, batch_size=args.batch_size)
    print(format_predictions(results, as_json=args.json), end="")


def _add_deploy_parsers(sub: argparse._SubParsersAction) -> None:
    """`ssm2d export` and `ssm2d predict` (logic in ssm2d.deploy)."""
    x = sub.add_parser(
        "export", help="export a checkpoint to ONNX (or a torch.export program) and check it against PyTorch"
    )
    x.add_argument("--checkpoint", required=True, help="last.pt or best.pt of `ssm2d train`")
    x.add_argument("--output", required=True, help="file to write: model.onnx, or model.pt2 with --format torch-export")
    x.add_argument("--img-size", type=_positive, help="input size (default: the training size), the only one the file takes")
    x.add_argument("--format", choices=("onnx", "torch-export"), default="onnx")
    x.add_argument("--opset", type=_positive, default=18, help="ONNX opset (>= 17; default 18)")
    x.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |exported - PyTorch| (default 1e-4)")
    x.add_argument("--check-batch", type=_positive, default=4, help="size of the random check batch (default 4)")
    x.set_defaults(func=_export)

    p = sub.add_parser("predict", help="top-k classes of image files (PNG, JPEG, ...) with a trained checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders to walk")
    p.add_argument("--checkpoint", required=True, help="last.pt or best.pt of `ssm2d train` (transform, class names)")
    p.add_argument("--topk", type=_positive, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--onnx", help="run this file of `ssm2d export` with onnxruntime instead of PyTorch")
    p.add_argument("--batch-size", type=_positive, default=32)
    p.set_defaults(func=_predict)


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
    p.add_argument("--resume", action="store_true", help="continue the run in OUTPUT from its last.pt")
    p.add_argument(
        "--allow-schedule-change", action="store_true",
        help="with --resume: accept other epochs, lr, warm-up, min lr, batch size or number of processes "
        "than the run was started with (the new schedule continues from the same step)",
    )  # fmt: skip
    hints = typing.get_type_hints(TrainConfig)
    for name in _OTHER_KEYS:  # the rest of TrainConfig, read by the key's type in _overrides
        flag = dict(nargs="?", const="true") if hints[name] is bool else {}  # a bare --pretrained means true
        p.add_argument("--" + name.replace("_", "-"), dest=name, metavar="VALUE", help=argparse.SUPPRESS, **flag)


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

    s = sub.add_parser("study", help="run the named experiments of a study file, resumably, and render the report")
    s.add_argument("config", help="study YAML (configs/study.yaml)")
    s.add_argument("--output", help="folder for study.json and runs/ (re-run the same command to continue)")
    s.add_argument("--quick", action="store_true", help="smoke test: the file's quick overrides (one epoch, tiny data, "
                   "one seed), into a temporary folder unless --output; the report stays in that folder")
    s.add_argument("--only", nargs="+", metavar="EXPERIMENT", help="train only these experiments' runs")
    s.add_argument("--models", nargs="+", metavar="MODEL", help="train only these models' runs (within --only)")
    s.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="train only these seeds' runs (within --only "
                   "and --models): processes that share a study's training each take their seeds and --output, "
                   "and one of them takes over the others' with --resume-from and their runs/ folders")
    s.add_argument("--resume-from", help="a study.json (e.g. docs/results.json) whose finished runs are taken over")
    s.add_argument("--render-only", action="store_true", help="render the report from OUTPUT/study.json (or "
                   "--resume-from) without training")
    s.add_argument("--timing", action="store_true", help="train nothing: time the training step of the models "
                   "(within --only and --models) side by side, merge the times into OUTPUT/study.json and render "
                   "(a normal run times the models that have no time yet at its end)")
    s.add_argument("--docs", default="docs", help="folder for results.md, results.json and img/ (default docs)")
    s.add_argument("--readme", default="README.md", help="file whose study-results block is updated (default README.md; "
                   "skipped when it does not exist)")
    s.set_defaults(func=_study)

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
    _add_deploy_parsers(sub)
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
    except (Ssm2dError, OSError) as err:
        message = _one_line(err)
        if message is None or os.environ.get("SSM2D_TRACEBACK") == "1":
            raise
        sys.exit(f"ssm2d {args.command}: error: {message}")
    finally:
        shutdown_distributed()

"""Command line: `ssm2d kernels ...` (also `python -m ssm2d`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from .layers import SSM2D
from .viz import layer_kernel_panels, save_kernel_heatmaps


def _kernels(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    layer = SSM2D(args.dim, state_dim=args.state_dim, directions=args.directions, variant=args.variant)
    grid = (args.grid[0], args.grid[1])
    panels = layer_kernel_panels(layer, grid)
    title = f"SSM2D at initialization ({args.variant}, N={args.state_dim}, seed {args.seed}), grid {grid[0]}x{grid[1]}"
    path = save_kernel_heatmaps(panels, args.output, channels=args.channels, title=title)
    print(f"wrote {path}")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssm2d", description="2-D spatial layers for vision models.")
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernels", help="write PNG heat maps of 2-D SSM kernels")
    source = k.add_mutually_exclusive_group(required=True)
    source.add_argument("--init", action="store_true", help="a freshly initialized layer")
    k.add_argument("--dim", type=_positive, default=192, help="channels (default 192)")
    k.add_argument("--state-dim", type=_positive, default=16, help="states N (default 16)")
    k.add_argument("--directions", type=int, choices=(1, 2, 4), default=4)
    k.add_argument("--variant", choices=("real", "complex"), default="real")
    k.add_argument("--grid", type=_positive, nargs=2, default=(14, 14), metavar=("H", "W"))
    k.add_argument("--channels", type=_positive, default=6, help="channels to show (default 6)")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--output", required=True, help="PNG file to write")
    k.set_defaults(func=_kernels)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)

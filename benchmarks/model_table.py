"""The table of registered models in docs/models.md: parameters, what the spatial layers add, GFLOPs.

GFLOPs are counted by torch's FlopCounterMode (2 per multiply-add) for one image at the model's
default resolution, in eval mode, kernel generation included. torch has no formula for FFTs,
so they are added here at 2.5 N log2 N per real transform of N points (5 N log2 N complex).
Elementwise operations are not counted, as in fvcore and timm.

    python benchmarks/model_table.py                 # print the table
    python benchmarks/model_table.py --update-docs   # also rewrite docs/models.md
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

# This folder holds a script named like the package: take it off the path before importing.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import ssm2d  # noqa: E402
from ssm2d.models import spatial_layers  # noqa: E402

sys.path.append(str(_HERE))
from _report import ROOT, markdown_table, text_table, update_section  # noqa: E402

aten = torch.ops.aten


def _fft_flops(points: int, batch: int, complex_: bool) -> int:
    return int((5.0 if complex_ else 2.5) * points * math.log2(max(points, 2)) * batch)


def _split(shape: tuple[int, ...], dim: list[int]) -> tuple[int, int]:
    points = math.prod(shape[d] for d in dim)
    return points, math.prod(shape) // points


def _r2c(x_shape, dim, normalization, onesided, out_shape=None) -> int:
    return _fft_flops(*_split(x_shape, dim), complex_=False)


def _c2r(x_shape, dim, normalization, last_dim_size, out_shape=None) -> int:
    return _fft_flops(*_split(out_shape, dim), complex_=False)


def _c2c(x_shape, dim, normalization, forward, out_shape=None) -> int:
    return _fft_flops(*_split(x_shape, dim), complex_=True)


FFT_FORMULAS = {aten._fft_r2c: _r2c, aten._fft_c2r: _c2r, aten._fft_c2c: _c2c}


def gflops(model: torch.nn.Module, input_size: tuple[int, int, int]) -> float:
    with FlopCounterMode(display=False, custom_mapping=FFT_FORMULAS) as counter, torch.no_grad():
        model(torch.randn(1, *input_size))
    return counter.get_total_flops() / 1e9


def baseline_of(name: str) -> str | None:
    """The registered model without spatial layers: drop the `_ssm2d...` (or comparator) part of the name."""
    base = re.sub(r"_(ssm2d(_ffn|_complex)?|s4nd|v2m|vim|ss2d|spsa|dwconv|ema)(?=_|$)", "", name)
    return None if base == name else base


def rows(names: list[str]) -> list[dict]:
    out, params = [], {}
    for name in names:
        model = ssm2d.create_model(name).eval()
        params[name] = sum(p.numel() for p in model.parameters())
        input_size = tuple(model.pretrained_cfg["input_size"])
        spatial = spatial_layers(model)
        base = baseline_of(name)
        if base is not None and base not in params:
            params[base] = sum(p.numel() for p in ssm2d.create_model(base).parameters())
        out.append({
            "name": name,
            "input": "x".join(map(str, input_size)),
            "params": params[name],
            "spatial_layers": len(spatial),
            "baseline": base,
            "added_params": params[name] - params[base] if base else 0,
            "gflops": gflops(model, input_size),
        })  # fmt: skip
    return out


def table(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "input", "params (M)", "spatial layers", "added vs baseline", "added %", "GFLOPs"]
    body = []
    for r in results:
        base = r["params"] - r["added_params"]
        added = f"{r['added_params'] / 1e3:+,.1f}k" if r["baseline"] else "-"
        pct = f"{100 * r['added_params'] / base:+.1f}%" if r["baseline"] else "-"
        body.append([f"`{r['name']}`", r["input"], f"{r['params'] / 1e6:.3f}", str(r["spatial_layers"]), added, pct,
                     f"{r['gflops']:.3f}"])  # fmt: skip
    return header, body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pattern", default="*", help="shell pattern over ssm2d.list_models()")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the generated table of docs/models.md")
    args = parser.parse_args()
    header, body = table(rows(ssm2d.list_models(args.pattern)))
    print(text_table(header, body))
    if args.update_docs:
        command = "python " + " ".join(["benchmarks/model_table.py", *sys.argv[1:]])
        note = (
            f"Command: `{command}`. Added parameters are the model's minus its baseline's (the same name without "
            "`_ssm2d`, `_s4nd`, `_v2m`, `_vim`, `_ss2d`, `_spsa`, `_dwconv` or, for Mega, `_ema`); for ConvNeXt they "
            "are net of the depthwise convolutions replaced. GFLOPs: one image at the default input, torch's "
            "FlopCounterMode (2 per multiply-add) plus FFTs at 2.5 N log2 N per real transform; elementwise "
            "operations are not counted."
        )
        update_section(ROOT / "docs" / "models.md", "models", note + "\n\n" + markdown_table(header, body))
        print("updated docs/models.md")


if __name__ == "__main__":
    main()

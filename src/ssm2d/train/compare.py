"""`ssm2d compare`: train several models with one recipe over several seeds, and tabulate them."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import ConfigError
from .config import TrainConfig
from .io import write_text_atomic
from .trainer import train

__all__ = ["compare", "format_table"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _summarize(model: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    finals = [r["final"] for r in runs]
    acc, acc_std = _mean_std([f["val_acc1"] for f in finals])
    best, best_std = _mean_std([r["best_acc1"] for r in runs])
    loss, loss_std = _mean_std([f["val_loss"] for f in finals])
    seconds = statistics.fmean(row["epoch_seconds"] for r in runs for row in r["history"])
    return {
        "model": model, "params": runs[0]["params"], "seeds": [r["config"]["seed"] for r in runs],
        "val_acc1": acc, "val_acc1_std": acc_std, "best_acc1": best, "best_acc1_std": best_std,
        "val_loss": loss, "val_loss_std": loss_std, "epoch_seconds": seconds,
        "curves": [[(row["epoch"], row["val_acc1"]) for row in r["history"]] for r in runs],
    }  # fmt: skip


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: accuracy as mean ± std over seeds, parameters, seconds per epoch."""
    lines = [
        "| model | params | val top-1 % (final) | val top-1 % (best) | val loss | s / epoch | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['model']}` | {r['params'] / 1e6:.3f}M | {r['val_acc1']:.2f} ± {r['val_acc1_std']:.2f} "
            f"| {r['best_acc1']:.2f} ± {r['best_acc1_std']:.2f} | {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} "
            f"| {r['epoch_seconds']:.1f} | {len(r['seeds'])} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Validation top-1 against epoch: the mean over seeds, with a ± std band."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in rows:
        epochs = [e for e, _ in r["curves"][0]]
        per_epoch = list(zip(*[[a for _, a in c] for c in r["curves"]], strict=True))
        mean = [statistics.fmean(v) for v in per_epoch]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_epoch]
        (line,) = ax.plot(epochs, mean, marker="o", markersize=3, label=r["model"])
        if len(r["seeds"]) > 1:
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def compare(
    cfg: TrainConfig,
    models: list[str],
    seeds: list[int],
    resume: bool = False,
    allow_schedule_change: bool = False,
    is_main: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train every model with every seed under `cfg`'s recipe, into `cfg.output/<model>/seed<k>`.

    Writes `compare.md`, `compare.json` and `compare.png` (validation top-1 against epoch) into
    `cfg.output` (process 0 only) and returns {"rows": [...], "table": markdown}. `command`, the
    command line that asked for the comparison, is recorded in both files when given.
    """
    if not models:
        raise ConfigError("models: expected at least one model name, got none")
    if not seeds:
        raise ConfigError("seeds: expected at least one seed, got none")
    out = Path(cfg.output)
    rows = []
    for model in models:
        runs = [
            train(
                dataclasses.replace(cfg, model=model, seed=seed, output=str(out / model / f"seed{seed}")), resume,
                allow_schedule_change,
            )  # fmt: skip
            for seed in seeds
        ]
        rows.append(_summarize(model, runs))
    table = format_table(rows)
    if is_main:
        recipe = {k: v for k, v in cfg.to_dict().items() if k not in ("model", "seed", "output")}
        header = f"{cfg.dataset}, {cfg.epochs} epochs, train fraction {cfg.train_fraction}, seeds {seeds}"
        quoted = f"Command: `{command}`\n\n" if command else ""
        write_text_atomic(out / "compare.md", f"# {header}\n\n{quoted}{table}")
        payload = {"command": command, "header": header, "recipe": recipe, "rows": rows}
        write_text_atomic(out / "compare.json", json.dumps(payload, indent=1) + "\n")
        _plot(rows, header, out / "compare.png")
    return {"rows": rows, "table": table}

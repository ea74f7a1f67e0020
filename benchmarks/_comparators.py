"""The "comparators" section of `benchmarks/models.py`: the other spatial layers' models against
`vit_mini_28` (Vim, V2M, VMamba's SS2D, Mega with the 2-D SSM), one training step at batch 64,
all in one alternation, with each step's counted FLOPs, its shares of selective scan and of
matrix multiplies, and the floor those set for the arms that hold the baseline whole."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from _report import markdown_table, run_line
from _timing import alternate_runs, train_step_fn
from torch.profiler import profile
from torch.utils.flop_counter import FlopCounterMode

import ssm2d

__all__ = [
    "COMPARATORS", "COMPARATOR_BATCH", "comparator_lines", "comparator_markdown", "comparator_readme_markdown",
    "comparator_rows", "measure_comparators",
]  # fmt: skip

# Comparator models -> the most times vit_mini_28's training step they may take (batch 64), or
# None where no target is set.
COMPARATOR_BASELINE = "vit_mini_28"
COMPARATORS: dict[str, float | None] = {
    "vit_mini_28_vim": 2.0, "vim_mini_28": 2.0, "vit_mini_28_v2m": 3.0, "v2m_mini_28": 3.0,
    "vit_mini_28_ss2d": None, "vmamba_mini_28": None, "vit_mini_28_ssm2d": None, "mega_mini_28_ssm2d": None,
}  # fmt: skip
COMPARATOR_BATCH = 64


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Matrix-multiply and convolution FLOPs of one forward + backward (torch's flop counter)."""
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# The selective scan's autograd function, forward and backward, as torch.profiler names them
# (their time counted with their children), and the matrix multiplies (their own time).
SCAN_EVENTS = ("_FusedScan", "_FusedScanBackward")
MATMUL_EVENTS = ("aten::mm", "aten::addmm", "aten::bmm")


def step_shares(step: Callable[[], None], steps: int = 3) -> tuple[float, float]:
    """Fractions of `steps` calls of `step` spent in the selective scan and in matrix multiplies;
    the profiler's overhead falls on the rest, so the shares are if anything too small."""
    with profile() as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    scan = sum(e.cpu_time_total for e in events if e.key in SCAN_EVENTS)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_EVENTS)
    return scan / 1e6 / wall, matmul / 1e6 / wall


def floor_ratio(r: dict, base: dict) -> float:
    """The least step time, over the baseline's, of a model that holds the baseline whole: the
    baseline's step, plus the model's scans, plus its matrix multiplies beyond the baseline's."""
    extra_matmul = max(0.0, r["matmul_share"] * r["ratio"] - base["matmul_share"] * base["ratio"])
    return 1 + r["scan_share"] * r["ratio"] + extra_matmul


def measure_comparators(batch: int, reps: int) -> dict:
    """Training step (ms) of the baseline and every comparator model, all in one alternation,
    and each step's counted FLOPs."""
    torch.manual_seed(0)
    names = [COMPARATOR_BASELINE, *COMPARATORS]
    models = [ssm2d.create_model(name) for name in names]
    c, h, w = models[0].pretrained_cfg["input_size"]
    x = torch.randn(batch, c, h, w)
    y = torch.randint(0, models[0].num_classes, (batch,))
    flops = [step_flops(m, x, y) for m in models]
    steps = [train_step_fn(m, x, y) for m in models]
    runs = alternate_runs(steps, reps)
    shares = [step_shares(step) for step in steps]
    times = [1e3 * statistics.median(r) for r in runs]
    # a repetition times the models within seconds of each other: the ratio within it sees one
    # machine speed, which drifts on this VM by up to 1.6x from minute to minute
    ratios = [statistics.median(t / b for t, b in zip(r, runs[0], strict=True)) for r in runs]
    print(f"comparators (batch {batch}, train ms): " + ", ".join(f"{n} {t:.1f}" for n, t in zip(names, times)))
    return {
        "baseline": COMPARATOR_BASELINE, "input": f"{c}x{h}x{w}", "batch": batch, "reps": reps,
        "models": [{"model": n, "params": sum(p.numel() for p in m.parameters()), "train_ms": t,
                    "ratio": q, "gflops": f / 1e9, "flop_ratio": f / flops[0], "scan_share": s[0],
                    "matmul_share": s[1]}
                   for n, m, t, q, f, s in zip(names, models, times, ratios, flops, shares)],
    }  # fmt: skip


def _holds_baseline(r: dict, comp: dict) -> bool:
    """Whether the model is the baseline with layers added (so at least as slow) and has shares."""
    return r["model"].startswith(comp["baseline"] + "_") and "matmul_share" in r


def comparator_rows(comp: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "params", "train ms", f"over `{comp['baseline']}`", "target", "counted GFLOP",
              "FLOPs over baseline", "scan share", "scan over baseline", "matmul share", "floor"]  # fmt: skip
    base = comp["models"][0]
    body = [[f"`{r['model']}`", f"{r['params'] / 1e3:,.0f}k", f"{r['train_ms']:.1f}", f"{r['ratio']:.2f}x",
             f"<= {COMPARATORS[r['model']]:g}x" if COMPARATORS.get(r["model"]) else "-",
             f"{r['gflops']:.2f}" if "gflops" in r else "", f"{r['flop_ratio']:.2f}x" if "flop_ratio" in r else "",
             f"{r['scan_share']:.0%}" if "scan_share" in r else "",
             f"{r['scan_share'] * r['ratio']:.2f}x" if "scan_share" in r else "",
             f"{r['matmul_share']:.0%}" if "matmul_share" in r else "",
             f"{floor_ratio(r, base):.2f}x" if _holds_baseline(r, comp) else "-"]
            for r in comp["models"]]  # fmt: skip
    return header, body


def comparator_lines(comp: dict) -> list[str]:
    lines = []
    for r in comp["models"]:
        limit = COMPARATORS.get(r["model"])
        if limit:
            verdict = "met" if r["ratio"] <= limit else "NOT met"
            floor = ""
            if _holds_baseline(r, comp):
                floor = (f"; it holds `{comp['baseline']}` whole, and with only its scans and its extra matrix "
                         f"multiplies it takes at least {floor_ratio(r, comp['models'][0]):.2f}x")  # fmt: skip
            lines.append(f"- `{r['model']}` training step at batch {comp['batch']}: {r['ratio']:.2f}x "
                         f"`{comp['baseline']}` (target <= {limit:g}x): {verdict}{floor}")  # fmt: skip
    return lines


def comparator_markdown(payload: dict) -> str:
    comp, m = payload["comparators"], payload["machine"]
    return "\n".join([
        "### Comparators: the other spatial layers' models against the plain ViT (float32)",
        "",
        f"Command: `{payload['command']}`  ",
        f"Run: {payload['date']} on {m['cpu']}, {m['threads']} threads, torch {m['torch']}; one training step "
        f"(forward, cross-entropy backward, AdamW step) at batch {comp['batch']} on {comp['input']} input, the "
        f"{len(comp['models'])} models timed in one alternation, {comp['reps']} repetitions: the times are "
        "medians, each ratio the median over repetitions of the ratio within one. "
        "Counted GFLOP: the matrix multiplies and convolutions of one forward + backward "
        "(`torch.utils.flop_counter`); the scans' own arithmetic is not in it. Scan share and matmul share: "
        "the fractions of the model's step spent in the selective scan's forward and backward and in matrix "
        "multiplies (torch.profiler, 3 steps); scan over baseline: the scan's time in units of the baseline's "
        "step. Floor, for the models that hold the baseline whole: the baseline's step plus the model's scans "
        "plus its matrix multiplies beyond the baseline's, over the baseline's step; the least such a model "
        "can take whatever its other layers cost.",
        "",
        markdown_table(*comparator_rows(comp)),
        "",
        "Targets:",
        *comparator_lines(comp),
    ])  # fmt: skip


def comparator_readme_markdown(payload: dict) -> str:
    """The comparators' block of the README: the table's first columns and the verdicts."""
    comp = payload["comparators"]
    header, body = comparator_rows(comp)
    keep = [0, 1, 3, 4, 10]  # model, params, ratio, target, floor
    return "\n".join([
        run_line(payload["command"], payload) + ", training "
        f"step at batch {comp['batch']} on {comp['input']}:",
        "",
        markdown_table([header[i] for i in keep], [[r[i] for i in keep] for r in body]),
        "",
        *comparator_lines(comp),
    ])  # fmt: skip

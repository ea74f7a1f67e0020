"""Cost of every spatial layer and of plain attention at equal width, and of the selective scan.

Layers (each in its default configuration) on (16, H, W, 192) float32 inputs, H = W = 14, 28, 56:
forward + backward time (median, after a warm-up step) and peak memory: the growth of the peak
RSS (VmHWM) over the resident set once the layer, its input and the output gradient exist, in
a fresh process per case. A case that runs out of its memory budget or time is reported as '-'
with the reason.

Scan: forward + backward at B 2, D 192, L 3136 (56 x 56 tokens), N 16, with D, z, delta_bias
and softplus as Vim calls it: `selective_scan` on the CPU (the fused numba kernel), the chunked
torch scan (`chunk_size` given), mambapy's `pscan` (the usual pure-PyTorch choice, called as
mambapy's `MambaBlock.selective_scan` calls it) and the sequential `selective_scan_ref`, timed in
alternation.

    python benchmarks/mixers.py                  # full table, JSON in outputs/
    python benchmarks/mixers.py --update-docs    # also rewrites docs/benchmarks.md and README.md
    python benchmarks/mixers.py --quick          # 14 x 14 only, one repetition
    python benchmarks/mixers.py --render outputs/benchmarks/mixers.json   # docs from an earlier run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from mambapy.pscan import pscan
from timm.layers import Attention

# This folder holds a script named like the package: take it off the path before importing.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
from ssm2d.layers import S4ND, SS2D, SSM2D, V2M, SPAttention, VimMixer2d  # noqa: E402
from ssm2d.ops import default_chunk_size, selective_scan, selective_scan_ref  # noqa: E402

sys.path.append(str(_HERE))
from _report import (  # noqa: E402
    ROOT, markdown_table, median_ms, report, run_header, run_line, status_kb, update_docs_and_readme,
)

BATCH, DIM = 16, 192
SCAN = {"batch": 2, "channels": DIM, "state": 16, "length": 56 * 56}
SLOW_STEP_S = 5.0  # cases whose warm-up step takes longer get at most 2 timed repetitions
# The fused scan's speed-up over pscan and over the sequential ref, and SSM2D vs attention.
TARGETS = {"scan_over_pscan": 30.0, "scan_over_ref": 10.0, "attention_side": 56}


class Attention2d(nn.Module):
    """timm's `Attention` (fused: `F.scaled_dot_product_attention`) on the row-major tokens of a grid."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        return self.attn(x.flatten(1, 2)).unflatten(1, x.shape[1:3])


# name -> constructor at width C, each with its defaults
LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "ssm2d": SSM2D,
    "s4nd": S4ND,
    "vim": VimMixer2d,
    "v2m": V2M,
    "ss2d": SS2D,
    "sp_attention": SPAttention,
    "attention": lambda dim: Attention2d(dim, _heads(dim)),
}


def _heads(dim: int) -> int:
    return SPAttention(dim).num_heads  # plain attention gets SP-SA's heads


def describe(name: str) -> dict:
    """Class, configuration (`extra_repr`) and parameter count of a layer at width C."""
    layer = LAYERS[name](DIM)
    if isinstance(layer, Attention2d):
        config = f"timm Attention, num_heads={layer.attn.num_heads}, qkv_bias=True, fused_attn={layer.attn.fused_attn}"
    else:
        config = f"{type(layer).__name__}({layer.extra_repr()})"
    return {"config": config, "params": sum(p.numel() for p in layer.parameters())}


def layer_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x).backward(grad)


def _limit_memory(budget_gb: float) -> float:
    """Cap this process's address space at its current size plus the budget (less if the
    machine has less available), so that an oversized case fails with an allocation error
    instead of waking the OOM killer on a shared machine. Returns the budget in GB."""
    meminfo = Path("/proc/meminfo").read_text()
    available_gb = int(meminfo.split("MemAvailable:")[1].split()[0]) / 2**20
    budget_gb = max(0.5, min(budget_gb, available_gb - 1.0))
    limit = status_kb("VmSize") * 1024 + int(budget_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return budget_gb


def _measure_case(name: str, side: int, reps: int, budget_gb: float) -> None:
    """One layer on one grid, in this (fresh) process: prints a JSON line."""
    torch.manual_seed(0)
    layer = LAYERS[name](DIM)
    layer_step(layer, torch.randn(BATCH, 2, 2, DIM, requires_grad=True), torch.randn(BATCH, 2, 2, DIM))  # load code
    budget_gb = _limit_memory(budget_gb)
    out: dict[str, object] = {"budget_gb": round(budget_gb, 1)}
    try:
        x = torch.randn(BATCH, side, side, DIM, requires_grad=True)
        grad = torch.randn_like(x)
        resident_kb = status_kb("VmRSS")
        start = time.perf_counter()
        layer_step(layer, x, grad)
        first_s = time.perf_counter() - start
        out["peak_mb"] = (status_kb("VmHWM") - resident_kb) / 1024
        out["reps"] = reps if first_s <= SLOW_STEP_S else min(reps, 2)
        out["ms"] = median_ms(lambda: layer_step(layer, x, grad), out["reps"], warmup=0)
    except (MemoryError, RuntimeError) as error:  # torch reports a failed allocation as RuntimeError
        if "alloc" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        out = {"error": f"out of memory (budget {budget_gb:.1f} GB)"}
    print(json.dumps(out))


def measure_case(name: str, side: int, reps: int, budget_gb: float, timeout_s: float) -> dict:
    """`_measure_case` in a fresh process, so that every case starts from the same memory."""
    command = [sys.executable, __file__, "--measure-case", name, str(side), str(reps), str(budget_gb)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"not finished after {timeout_s:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed (exit {done.returncode}: {tail})"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def scan_inputs(batch: int, channels: int, state: int, length: int) -> list[torch.Tensor]:
    """Vim's call: u, delta, A (S4D-real), B, C, D, z, delta_bias, all requiring grad."""
    gen = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(batch, channels, length, generator=gen) for _ in range(3))
    a = -torch.arange(1.0, state + 1).repeat(channels, 1)  # (D, N)
    b, c = (torch.randn(batch, state, length, generator=gen) for _ in range(2))
    d, bias = torch.ones(channels), torch.randn(channels, generator=gen) * 0.1
    return [t.requires_grad_() for t in (u, delta, a, b, c, d, z, bias)]


def pscan_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True) -> torch.Tensor:
    """The same scan through mambapy's `pscan`, as its `MambaBlock.selective_scan` calls it (in its
    (B, L, D) layout), with softplus, bias and gate around it."""
    dt = F.softplus(delta + delta_bias[:, None]).mT  # (B, L, D)
    x = u.mT
    delta_a = torch.exp(dt.unsqueeze(-1) * A)  # (B, L, D, N)
    bx = dt.unsqueeze(-1) * B.mT.unsqueeze(2) * x.unsqueeze(-1)  # (B, L, D, N)
    hs = pscan(delta_a, bx)
    y = (hs @ C.mT.unsqueeze(-1)).squeeze(3) + D * x  # (B, L, D)
    return y.mT * F.silu(z)


def chunked(*args, **kwargs) -> torch.Tensor:
    return selective_scan(*args, **kwargs, chunk_size=default_chunk_size(args[0].shape[-1]))


SCANS = {"fused": selective_scan, "chunked": chunked, "pscan": pscan_scan, "ref": selective_scan_ref}


def measure_scan(reps: int, ref_reps: int) -> dict:
    """Forward + backward ms of each scan: fused, chunked and pscan in alternation, then the ref."""
    inputs = scan_inputs(**SCAN)
    grad = torch.randn_like(inputs[0])

    def step(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run_once() -> None:
            for t in inputs:
                t.grad = None
            fn(*inputs, delta_softplus=True).backward(grad)

        return run_once

    for name in ("fused", "chunked", "pscan"):
        step(SCANS[name])()  # warm-up: compile or load the kernel, allocate the workspaces
    times: dict[str, list[float]] = {"fused": [], "chunked": [], "pscan": []}
    for _ in range(reps):
        for name, out in times.items():
            start = time.perf_counter()
            step(SCANS[name])()
            out.append(time.perf_counter() - start)
    ms = {name: 1e3 * sorted(t)[len(t) // 2] for name, t in times.items()}
    ms["ref"] = median_ms(step(selective_scan_ref), ref_reps, warmup=0)  # one op per step: nothing to warm
    return {**SCAN, **{f"{name}_ms": v for name, v in ms.items()},
            "over_pscan": ms["pscan"] / ms["fused"], "over_ref": ms["ref"] / ms["fused"]}  # fmt: skip


def run(layers: list[str], sides: list[int], reps: int, budget_gb: float, timeout_s: float) -> list[dict]:
    results = []
    for side in sides:
        for name in layers:
            r = {"layer": name, "side": side, **measure_case(name, side, reps, budget_gb, timeout_s)}
            done = f"{r['ms']:,.0f} ms, {r['peak_mb']:,.0f} MB" if "ms" in r else r["error"]
            print(f"  {name} {side}x{side}: {done}", file=sys.stderr, flush=True)
            results.append(r)
    return results


def check_targets(payload: dict) -> list[dict]:
    scan = payload["scan"]
    checks = [{"metric": metric, "value": scan[key], "limit": TARGETS[metric], "met": scan[key] >= TARGETS[metric]}
              for metric, key in (("scan_over_pscan", "over_pscan"), ("scan_over_ref", "over_ref"))]  # fmt: skip
    side = TARGETS["attention_side"]
    by_case = {(r["layer"], r["side"]): r for r in payload["results"]}
    ssm, attn = by_case.get(("ssm2d", side), {}), by_case.get(("attention", side), {})
    if "ms" in ssm and "ms" in attn:
        checks.append({"metric": "ssm2d_over_attention", "side": side, "value": ssm["ms"] / attn["ms"],
                       "limit": 1.0, "met": ssm["ms"] < attn["ms"]})  # fmt: skip
    return checks


SCAN_LABELS = {
    "fused": "`selective_scan` (fused numba kernel, CPU)",
    "chunked": "chunked torch scan (`chunk_size` given)",
    "pscan": "mambapy's `pscan`",
    "ref": "`selective_scan_ref` (sequential)",
}


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}{unit}" if value >= 100 else f"{value:.2f}{unit}" if value < 10 else f"{value:.1f}{unit}"


def rows(payload: dict) -> tuple[list[str], list[list[str]]]:
    results = payload["results"]
    sides = sorted({r["side"] for r in results})
    by_case = {(r["layer"], r["side"]): r for r in results}
    header = ["layer", "params"] + [f"{s}x{s} ms" for s in sides] + [f"{s}x{s} peak MB" for s in sides]
    body = []
    for name, info in payload["layers"].items():
        cases = [by_case.get((name, s), {}) for s in sides]
        body.append([name, f"{info['params']:,}"] + [fmt(c.get("ms")) for c in cases]
                    + [fmt(c.get("peak_mb")) for c in cases])  # fmt: skip
    return header, body


def target_lines(checks: list[dict], side: int = TARGETS["attention_side"]) -> list[str]:
    lines = []
    for c in checks:
        verdict = "met" if c["met"] else "NOT met"
        if c["metric"].startswith("scan_over_"):
            other = "mambapy's `pscan`" if c["metric"] == "scan_over_pscan" else "the sequential `selective_scan_ref`"
            lines.append(f"- fused selective scan vs {other} at L = {SCAN['length']}: "
                         f"{c['value']:.1f}x faster (target >= {c['limit']:g}x): {verdict}")  # fmt: skip
        else:
            lines.append(f"- `SSM2D` vs attention at {c['side']}x{c['side']}: {c['value']:.2f}x its time "
                         f"(target < 1x): {verdict}")  # fmt: skip
    if not any(c["metric"] == "ssm2d_over_attention" for c in checks):
        lines.append(f"- `SSM2D` vs attention at {side}x{side}: not measured")
    return lines


def markdown(payload: dict) -> str:
    m, scan = payload["machine"], payload["scan"]
    header, body = rows(payload)
    missing = [f"- {r['layer']} at {r['side']}x{r['side']}: {r['error']}" for r in payload["results"] if "error" in r]
    return "\n".join([
        "### Spatial layers at equal width (forward + backward, float32)",
        "",
        f"Command: `{payload['command']}`  ",
        f"Run: {payload['date']} on {m['cpu']}, {m['threads']} threads, torch {m['torch']}; batch {BATCH}, "
        f"C = {DIM}; median of {payload['reps']} timed repetitions after a warm-up step (of at most 2 where "
        f"that step took over {SLOW_STEP_S:g} s).",
        "",
        markdown_table(header, body),
        "",
        f"Each layer in its default configuration at C = {DIM}, on (B, H, W, C) = ({BATCH}, H, W, {DIM}); plain "
        "attention has `SPAttention`'s default heads (one per 64 channels) and runs torch's "
        "`scaled_dot_product_attention` on the row-major tokens, which `VimMixer2d` scans in both directions:",
        "",
        *(f"- {name}: `{info['config']}`" for name, info in payload["layers"].items()),
        "",
        "Peak MB: growth "
        "of the peak RSS (VmHWM) during the first forward + backward over the resident set with the layer, its "
        "input and the output gradient allocated, in a fresh process per case; it counts activations, "
        "temporaries and the gradients of the input and parameters.",
        *(["", "Not measured ('-'):", *missing] if missing else []),
        "",
        f"Selective scan, forward + backward at L = {scan['length']} (batch {scan['batch']}, D = {scan['channels']}, "
        f"N = {scan['state']}, with D, z, delta_bias and softplus as Vim calls it; the first three in alternation):",
        "",
        markdown_table(["scan", "ms", "fused is faster by"],
                       [[label, fmt(scan[f"{name}_ms"]), "-" if name == "fused" else
                         f"{scan[f'{name}_ms'] / scan['fused_ms']:.1f}x"] for name, label in SCAN_LABELS.items()]),
        "",
        "Targets:",
        *target_lines(payload["targets"]),
    ])  # fmt: skip


def readme_markdown(payload: dict) -> str:
    """The README's short form: the table and the target verdicts, under the command."""
    return "\n".join([
        run_line(payload["command"], payload, f"batch {BATCH}, C = {DIM}") + ":",
        "",
        markdown_table(*rows(payload)),
        "",
        *target_lines(payload["targets"]),
    ])  # fmt: skip


def update_docs(payload: dict) -> None:
    update_docs_and_readme("mixers", markdown(payload), readme_markdown(payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[14, 28, 56], help="grid sides H = W")
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS), help="layers to time")
    parser.add_argument("--quick", action="store_true", help="14 x 14 only, one repetition")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per case")
    parser.add_argument("--scan-reps", type=int, default=5, help="timed repetitions of the fused, chunked and pscan scans")
    parser.add_argument("--ref-reps", type=int, default=2, help="timed repetitions of the sequential ref scan")
    parser.add_argument("--scan-only", action="store_true", help="measure the scan alone (no layer table)")
    parser.add_argument("--memory-gb", type=float, default=20.0, help="memory budget of one case")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one case may take")
    parser.add_argument("--json", type=Path, default=ROOT / "outputs" / "benchmarks" / "mixers.json")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the generated section of the docs")
    parser.add_argument("--render", type=Path, help="rewrite the docs from the JSON of an earlier run")
    parser.add_argument("--measure-case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_case:
        name, side, reps, budget = args.measure_case
        _measure_case(name, int(side), int(reps), float(budget))
        return
    if args.render:
        update_docs(json.loads(args.render.read_text()))
        return
    if args.quick:
        args.sides, args.reps, args.scan_reps, args.ref_reps = [14], 1, 1, 1
    layers = {name: describe(name) for name in args.layers}
    results = [] if args.scan_only else run(args.layers, args.sides, args.reps, args.memory_gb, args.timeout)
    scan = measure_scan(args.scan_reps, args.ref_reps)
    print(f"  scan L={scan['length']}: " + ", ".join(f"{n} {scan[f'{n}_ms']:,.0f} ms" for n in SCANS), file=sys.stderr)
    payload = {
        **run_header("mixers"),
        "reps": args.reps,
        "layers": layers,
        "results": results,
        "scan": scan,
    }
    payload["targets"] = check_targets(payload)
    docs = update_docs if args.update_docs else None
    report(payload, rows(payload), target_lines(payload["targets"]), args.json, docs)


if __name__ == "__main__":
    main()

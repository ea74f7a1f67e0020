"""Cost of the spatial layers in whole models, each model against its own baseline.

For each +2-D SSM pair (float32, default resolution; batch 8, the batch of the targets, and
batch 64 for context, where the kernels' fixed cost per step is spread over more images):
- training step: forward + cross-entropy backward + AdamW step, in train mode;
- inference: eval mode under torch.no_grad, the SSM kernels cached after a first call.
Baseline and SSM model are timed in alternation, repetition by repetition, so that both see
the same machine state; the ratio is that of the medians.

The inference floor (batch 8) times each +2-D SSM model twice more, in the same alternation:
with every 2-D SSM layer cut down to its convolution alone (kernel prepared once, on the path
the cost model picks), and with every layer replaced by the identity (what remains is the
placement: splitting off prefix tokens and joining them back). The first is the least the
layer can cost as it is applied; the second, the least its placement costs.

Further sections, each with its own JSON key and table:
- "mega": the training step of `mega_sd_32_ssm2d` (the 2-D SSM in Mega's moving-average slot)
  against `mega_sd_32_ema` (Mega's own EMA) and `mega_sd_32` (no moving average, "Mega-ablate"),
  the three in alternation, at the same batches.
- "compile": the training step of `vit_sd_32_ssm2d` (batch 8 and 64) under `torch.compile`
  against eager mode, in alternation, with the compile time (the first compiled step).
- "comparators": one training step of the other spatial layers' models at batch 64 on 28 x 28 x 1
  input against `vit_mini_28`, all in one alternation (each ratio is the median over repetitions
  of the ratio within one repetition, where the models run seconds apart): Vim and V2M (the ViT with their layers and
  the stand-alone models; targets: at most 2x for Vim, 3x for V2M), VMamba's SS2D in the ViT and
  the VMamba backbone, and Mega with the 2-D SSM. Beside each time, the step's matrix-multiply
  and convolution FLOPs (`torch.utils.flop_counter`, forward + backward; the scans' own
  arithmetic is not counted) over the baseline's: the work a model's layers add whatever the
  kernels, so a step ratio below the FLOP ratio is not to be expected. And the shares of the
  step spent in the selective scan (forward and backward) and in matrix multiplies
  (torch.profiler over a few steps): a model that holds the whole baseline (the `vit_mini_28_*`
  arms) cannot step faster than the baseline plus its scans plus its extra matrix multiplies
  (the "floor" column).
- "deploy": inference of `vit_mini_28_ssm2d` at batch 1 and 64 in eager PyTorch (eval, no_grad,
  kernels cached) and in onnxruntime on the file of `ssm2d export` (kernels materialized as
  depthwise convolutions), in alternation.

    python benchmarks/models.py                 # table and JSON in outputs/
    python benchmarks/models.py --update-docs   # also rewrites docs/benchmarks.md and README.md
    python benchmarks/models.py --render outputs/benchmarks/models.json   # docs from an earlier run
    python benchmarks/models.py --sections comparators --reps 3             # one section, fewer repetitions
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

# This folder holds a script named like the package: take it off the path before importing.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import ssm2d  # noqa: E402
from ssm2d.ops import (  # noqa: E402
    choose_conv_method,
    direct_conv2d,
    fft_conv2d,
    fft_shape,
    fold_directions,
    kernel_spectrum,
)

sys.path.append(str(_HERE))
from _comparators import (  # noqa: E402
    COMPARATOR_BATCH, comparator_lines, comparator_markdown, comparator_readme_markdown, comparator_rows,
    measure_comparators,
)
from _report import (  # noqa: E402
    ROOT, markdown_table, report, run_header, run_line, text_table, update_section,
)
from _timing import alternate, infer_fn, train_step_fn  # noqa: E402

from ssm2d.layers import SSM2D  # noqa: E402

PAIRS = [
    ("vit_sd_32", "vit_sd_32_ssm2d"),
    ("swin_sd_32", "swin_sd_32_ssm2d"),
    ("convnext_sd_32", "convnext_sd_32_ssm2d"),
    ("deit_tiny_224", "deit_tiny_224_ssm2d"),
]
TARGETS = {"train": 1.3, "infer": 1.1}
TARGET_BATCH = 8
SECTIONS = ("pairs", "compile", "comparators", "mega", "deploy")
AUTHORS_TRAIN = "2.16x (Swin) to 2.36x (Mega) slower training than the baseline, on GPU (the issue's figures)"


def run(pairs: list[tuple[str, str]], batches: list[int], reps: int) -> list[dict]:
    return [measure(base, ssm, batch, reps) for batch in batches for base, ssm in pairs]


def measure(base_name: str, ssm_name: str, batch: int, reps: int) -> dict:
    """Training step and inference of one pair, timed in alternation."""
    torch.manual_seed(0)
    models = [ssm2d.create_model(base_name), ssm2d.create_model(ssm_name)]
    c, h, w = models[0].pretrained_cfg["input_size"]
    x = torch.randn(batch, c, h, w)
    y = torch.randint(0, models[0].num_classes, (batch,))
    train = alternate([train_step_fn(m, x, y) for m in models], reps)
    infer = alternate([infer_fn(m, x) for m in models], reps)
    print(f"{ssm_name} (batch {batch}): train {train[1]:.1f} / {train[0]:.1f} ms, "
          f"infer {infer[1]:.1f} / {infer[0]:.1f} ms")  # fmt: skip
    return {
        "baseline": base_name, "model": ssm_name, "input": f"{c}x{h}x{w}", "batch": batch,
        "train_ms": train, "infer_ms": infer,
        "train_ratio": train[1] / train[0], "infer_ratio": infer[1] / infer[0],
    }  # fmt: skip


def breakdown(model_name: str, batch: int, reps: int) -> dict[str, float]:
    """Training cost of the first block's 2-D SSM, by part, against the rest of its block (ms).

    kernel: `kernels()` forward+backward; fold: folding the directions (and the spectrum, on
    the FFT path) forward+backward; conv: the convolution forward+backward (input and kernel
    gradients); block: the baseline block forward+backward, without the SSM.
    """
    torch.manual_seed(0)
    model = ssm2d.create_model(model_name)
    wrapper = model.blocks[0].norm1
    layer, block = wrapper.spatial, model.blocks[0]
    c, h, w = model.pretrained_cfg["input_size"]
    p = model.patch_embed.patch_size
    grid = (h // p[0], w // p[1])
    method = choose_conv_method(grid, layer.kernel_grid(grid), backward=True)
    shape = fft_shape(grid, layer.kernel_grid(grid))
    kernels = layer.kernels(layer.kernel_grid(grid)).detach().requires_grad_()
    folded = fold_directions(kernels).detach().requires_grad_()
    x = torch.randn(batch, *grid, layer.dim, requires_grad=True)
    tokens = torch.randn(batch, model.num_prefix_tokens + grid[0] * grid[1], layer.dim, requires_grad=True)
    block.norm1 = wrapper.base  # the baseline block

    def prepare(k: torch.Tensor) -> torch.Tensor:
        full = fold_directions(k)
        return kernel_spectrum(full, shape) if method == "fft" else full

    def conv(k: torch.Tensor) -> torch.Tensor:
        return fft_conv2d(x, kernel_spectrum(k, shape), shape) if method == "fft" else direct_conv2d(x, k)

    parts = {
        "kernel": lambda: layer.kernels(layer.kernel_grid(grid)).sum().backward(),
        "fold": lambda: prepare(kernels).abs().sum().backward(),
        "conv": lambda: conv(folded).sum().backward(),
        "block": lambda: block(tokens).sum().backward(),
    }
    times = alternate(list(parts.values()), reps)
    return {"model": model_name, "batch": batch, "method": method, **dict(zip(parts, times, strict=True))}


class ConvOnly(nn.Module):
    """A 2-D SSM layer's convolution alone on one grid, with the kernel the layer itself prepares
    (and caches) for inference, prepared once: what the layer's forward does, without its
    per-call checks."""

    def __init__(self, layer: SSM2D, grid: tuple[int, int]) -> None:
        super().__init__()
        ksize = layer.kernel_grid(grid)
        self.method, self.shape = choose_conv_method(grid, ksize, backward=False), fft_shape(grid, ksize)
        with torch.no_grad():
            self.prepared = layer._prepared_kernel(grid, self.method, params_need_grad=False)
        # the direct path's kernel holds the skip as its center tap; the FFT path adds it
        self.omega = layer.omega.detach() if self.method == "fft" and layer.omega is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "direct":
            return direct_conv2d(x, self.prepared)
        y = fft_conv2d(x, self.prepared, self.shape)
        return y if self.omega is None else y + x * self.omega


def replace_layers(model: nn.Module, make: Callable[[SSM2D, tuple[int, int]], nn.Module], x: torch.Tensor) -> None:
    """Swap every SSM2D of `model` for make(layer, grid), the grid it sees on input x."""
    grids: dict[SSM2D, tuple[int, int]] = {}

    def record(layer: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        grids.setdefault(layer, tuple(args[0].shape[1:3]))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, SSM2D)]
    with torch.no_grad():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SSM2D):
                setattr(parent, name, make(child, grids[child]))


def inference_floor(base_name: str, ssm_name: str, batch: int, reps: int) -> dict:
    """Inference ms of the baseline, the +2-D SSM model, its layers as convolutions alone, and
    its layers as identities, timed in alternation."""
    torch.manual_seed(0)
    models = [ssm2d.create_model(name) for name in (base_name, ssm_name, ssm_name, ssm_name)]
    c, h, w = models[0].pretrained_cfg["input_size"]
    x = torch.randn(batch, c, h, w)
    replace_layers(models[2], ConvOnly, x)
    replace_layers(models[3], lambda layer, grid: nn.Identity(), x)
    times = alternate([infer_fn(m, x) for m in models], reps)
    print(f"{ssm_name} inference floor (batch {batch}, ms): " + ", ".join(f"{t:.1f}" for t in times))
    return {"model": ssm_name, "batch": batch, **dict(zip(("baseline", "model_ms", "conv_only", "identity"), times))}


COMPILE_MODEL = "vit_sd_32_ssm2d"
COMPILE_BATCHES = [8, 64]


def measure_compiled(model_name: str, batch: int, reps: int, backend: str) -> dict:
    """Training step of `model_name` eager and under torch.compile, timed in alternation; the
    compile time is that of the first compiled step (tracing, code generation, the step)."""
    torch.manual_seed(0)
    eager = ssm2d.create_model(model_name)
    compiled_model = ssm2d.create_model(model_name)
    compiled_model.load_state_dict(eager.state_dict())
    c, h, w = eager.pretrained_cfg["input_size"]
    x = torch.randn(batch, c, h, w)
    y = torch.randint(0, eager.num_classes, (batch,))
    torch._dynamo.reset()
    compiled_model.forward = torch.compile(compiled_model.forward, backend=backend)
    steps = [train_step_fn(eager, x, y), train_step_fn(compiled_model, x, y)]
    start = time.perf_counter()
    steps[1]()
    compile_s = time.perf_counter() - start
    eager_ms, compiled_ms = alternate(steps, reps)
    print(f"{model_name} (batch {batch}, {backend}): eager {eager_ms:.1f} ms, compiled {compiled_ms:.1f} ms, "
          f"compile {compile_s:.1f} s")  # fmt: skip
    return {"model": model_name, "batch": batch, "backend": backend, "eager_ms": eager_ms,
            "compiled_ms": compiled_ms, "speedup": eager_ms / compiled_ms, "compile_s": compile_s}  # fmt: skip


def compile_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "batch", "backend", "eager ms", "compiled ms", "speed-up", "compile s"]
    body = [
        [f"`{r['model']}`", str(r["batch"]), r["backend"], f"{r['eager_ms']:.1f}", f"{r['compiled_ms']:.1f}",
         f"{r['speedup']:.2f}x", f"{r['compile_s']:.0f}"]
        for r in results
    ]  # fmt: skip
    return header, body


def compile_markdown(payload: dict) -> str:
    """The compiled-step section of docs/benchmarks.md."""
    m = payload["machine"]
    return "\n".join([
        "### Compiled training step (float32)",
        "",
        f"Command: `{payload['command']}`  ",
        f"Run: {payload['date']} on {m['cpu']}, {m['threads']} threads, torch {m['torch']}.",
        "",
        markdown_table(*compile_rows(payload["compile"])),
        "",
        "Training step (forward, cross-entropy backward, AdamW step) in eager mode and with the model's forward "
        f"under `torch.compile`, timed in alternation, medians of {payload['reps']} repetitions; compile s: the "
        "first compiled step, tracing and code generation included.",
    ])  # fmt: skip


def floor_lines(floors: list[dict]) -> list[str]:
    lines = []
    for f in floors:
        base = f["baseline"]
        lines.append(
            f"- `{f['model']}`: {f['model_ms'] / base:.2f}x; convolutions alone {f['conv_only'] / base:.2f}x; "
            f"identities {f['identity'] / base:.2f}x"
        )
    return lines


def rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "baseline", "input", "batch", "train ms", "baseline ms", "train ratio", "infer ms",
              "baseline ms", "infer ratio"]  # fmt: skip
    body = [
        [f"`{r['model']}`", f"`{r['baseline']}`", r["input"], str(r["batch"]), f"{r['train_ms'][1]:.1f}",
         f"{r['train_ms'][0]:.1f}", f"{r['train_ratio']:.2f}x", f"{r['infer_ms'][1]:.1f}", f"{r['infer_ms'][0]:.1f}",
         f"{r['infer_ratio']:.2f}x"]
        for r in results
    ]  # fmt: skip
    return header, body


def target_lines(results: list[dict]) -> list[str]:
    lines = []
    for r in (r for r in results if r["batch"] == TARGET_BATCH):
        for kind, label in (("train", "training step"), ("infer", "inference")):
            ratio, target = r[f"{kind}_ratio"], TARGETS[kind]
            verdict = "met" if ratio <= target else "NOT met"
            lines.append(f"- `{r['model']}` {label}: {ratio:.2f}x its baseline (target <= {target}x): {verdict}")
    return lines


def markdown(payload: dict) -> str:
    m, b = payload["machine"], payload["breakdown"]
    header, body = rows(payload["results"])
    return "\n".join([
        "### Models: +2-D SSM against the baseline (float32)",
        "",
        f"Command: `{payload['command']}`  ",
        f"Run: {payload['date']} on {m['cpu']}, {m['threads']} threads, torch {m['torch']}; medians of "
        f"{payload['reps']} alternating repetitions.",
        "",
        markdown_table(header, body),
        "",
        "Training step: forward, cross-entropy backward and AdamW step, train mode. Inference: eval mode, "
        "no_grad, SSM kernels cached. Ratios: +2-D SSM time over its baseline's.",
        "",
        f"Where the time goes (`{b['model']}`, the first block's layer at batch {b['batch']}, training, forward + "
        f"backward, measured in the same run): the kernel {b['kernel']:.2f} ms, folding its directions "
        f"{b['fold']:.2f} ms, the convolution ({b['method']} path) {b['conv']:.2f} ms, against {b['block']:.2f} ms "
        "for the rest of the block. The kernel's cost does not grow with the batch: on these grids it is some "
        "hundreds of small operations, per-operation overhead rather than arithmetic, which larger batches spread "
        "over more images. Timings on this VM vary by up to 2x from run to run.",
        "",
        f"Inference floor (batch {TARGET_BATCH}, times over the baseline's, measured in the same run): the model "
        "as it is; with each 2-D SSM layer cut down to its convolution alone (kernel and skip prepared once, on "
        "the path the cost model picks); and with each layer replaced by the identity, which leaves the cost of "
        "the placement (in ConvNeXt, where the layer replaces the depthwise convolution, the identity removes that "
        f"too). Medians of {payload['floor_reps']} alternating repetitions.",
        *floor_lines(payload["floors"]),
        "",
        f"Targets (batch {TARGET_BATCH}):",
        *target_lines(payload["results"]),
        "",
        f"For comparison, the authors' implementation: {AUTHORS_TRAIN}.",
    ])  # fmt: skip


def readme_markdown(payload: dict) -> str:
    """The pairs' block of the README: each +2-D SSM model's ratios over its baseline."""
    header, body = rows(payload["results"])
    keep = [0, 2, 3, 6, 9]  # model, input, batch, train ratio, infer ratio
    return "\n".join([
        run_line(payload["command"], payload) + ":",
        "",
        markdown_table([header[i] for i in keep], [[r[i] for i in keep] for r in body]),
    ])  # fmt: skip


# Mega: the 2-D SSM in the moving-average slot, against Mega's EMA and against no slot.
MEGA_MODELS = ("mega_sd_32", "mega_sd_32_ema", "mega_sd_32_ssm2d")
AUTHORS_MEGA = "2.36x"  # Mega + 2-D SSM over Mega, training, on GPU (the figure)


def mega_measure(batch: int, reps: int) -> dict:
    """Training-step ms of the three Mega models, timed in alternation, and the ratios of the +2-D SSM one."""
    torch.manual_seed(0)
    models = [ssm2d.create_model(name) for name in MEGA_MODELS]
    c, h, w = models[0].pretrained_cfg["input_size"]
    x = torch.randn(batch, c, h, w)
    y = torch.randint(0, models[0].num_classes, (batch,))
    none, ema, ssm = alternate([train_step_fn(m, x, y) for m in models], reps)
    print(f"{MEGA_MODELS[2]} (batch {batch}): train {ssm:.1f} ms; {MEGA_MODELS[1]} {ema:.1f} ms; "
          f"{MEGA_MODELS[0]} {none:.1f} ms")  # fmt: skip
    return {"input": f"{c}x{h}x{w}", "batch": batch, "train_ms": {"none": none, "ema": ema, "ssm2d": ssm},
            "vs_ema": ssm / ema, "vs_none": ssm / none}  # fmt: skip


def mega_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["input", "batch", "no slot ms", "EMA ms", "2-D SSM ms", "2-D SSM / EMA", "2-D SSM / no slot"]
    body = [
        [r["input"], str(r["batch"]), f"{r['train_ms']['none']:.1f}", f"{r['train_ms']['ema']:.1f}",
         f"{r['train_ms']['ssm2d']:.1f}", f"{r['vs_ema']:.2f}x", f"{r['vs_none']:.2f}x"]
        for r in results
    ]  # fmt: skip
    return header, body


def mega_markdown(payload: dict) -> str:
    """The Mega section of docs/benchmarks.md (empty for a JSON written before it existed)."""
    if not payload.get("mega"):
        return ""
    names, m = ", ".join(f"`{n}`" for n in MEGA_MODELS), payload["machine"]
    return "\n".join([
        "",
        "### Mega: the 2-D SSM in place of the EMA (training step, float32)",
        "",
        f"Command: `{payload['command']}`  ",
        f"Run: {payload['date']} on {m['cpu']}, {m['threads']} threads, torch {m['torch']}.",
        "",
        f"{names}: no moving average, Mega's bidirectional EMA, and the 2-D SSM in its place, timed in "
        f"alternation in the same run (medians of {payload['reps']} repetitions; forward, cross-entropy "
        "backward and AdamW step).",
        "",
        markdown_table(*mega_rows(payload["mega"])),
        "",
        f"For comparison, the authors' implementation: Mega with the 2-D SSM trains {AUTHORS_MEGA} slower than "
        "Mega, on GPU (the issue's figure).",
    ])  # fmt: skip


def mega_readme_markdown(payload: dict) -> str:
    if not payload.get("mega"):
        return ""
    header, body = mega_rows(payload["mega"])
    keep = [1, 5, 6]  # batch, 2-D SSM / EMA, 2-D SSM / no slot
    return "\n".join([
        run_line(payload["command"], payload) + ": "
        f"`mega_sd_32_ssm2d`'s training step against Mega's EMA and against no moving average (authors, on GPU: "
        f"{AUTHORS_MEGA} over Mega):",
        "",
        markdown_table([header[i] for i in keep], [[r[i] for i in keep] for r in body]),
    ])  # fmt: skip


def update_docs(payload: dict) -> None:
    """Each measured section into docs/benchmarks.md, and its block of the README where it has one."""
    # payload key -> (section of docs/benchmarks.md, its writer, README block, its writer)
    sections = {
        "results": ("models", markdown, "models-results", readme_markdown),
        "comparators": ("models-comparators", comparator_markdown, "models-comparators", comparator_readme_markdown),
        "compile": ("models-compile", compile_markdown, None, None),
        "mega": ("models-mega", mega_markdown, "models-mega", mega_readme_markdown),
        "deploy": ("models-deploy", deploy_markdown, None, None),
    }
    for key, (section, docs_writer, block, readme_writer) in sections.items():
        if payload.get(key):
            update_section(ROOT / "docs" / "benchmarks.md", section, docs_writer(payload))
            if block is not None:
                update_section(ROOT / "README.md", block, readme_writer(payload))
    print("updated docs/benchmarks.md and README.md")


DEPLOY_MODEL, DEPLOY_BATCHES = "vit_mini_28_ssm2d", (1, 64)


def deploy_benchmark(model_name: str, batches: Sequence[int], reps: int) -> dict:
    """Inference ms of a model in eager PyTorch and of its exported ONNX file in onnxruntime (CPU,
    default threads), per batch size, timed in alternation; and the largest logit difference."""
    import tempfile

    from ssm2d.deploy import export_onnx, materialize_kernels, onnx_session

    torch.manual_seed(0)
    model = ssm2d.create_model(model_name).eval()
    c, h, w = model.pretrained_cfg["input_size"]
    with tempfile.TemporaryDirectory() as folder:
        frozen = materialize_kernels(model, torch.randn(2, c, h, w))
        session = onnx_session(export_onnx(frozen, torch.randn(2, c, h, w), Path(folder) / "model.onnx"))
    name = session.get_inputs()[0].name
    rows = []
    for batch in batches:
        x = torch.randn(batch, c, h, w)
        feed = {name: x.numpy()}
        with torch.no_grad():
            diff = float((torch.from_numpy(session.run(None, feed)[0]) - model(x)).abs().max())
        eager, ort = alternate([infer_fn(model, x), lambda: session.run(None, feed)], reps)
        print(f"{model_name} (batch {batch}): eager {eager:.2f} ms, onnxruntime {ort:.2f} ms, max diff {diff:.2g}")
        rows.append({"batch": batch, "eager_ms": eager, "onnxruntime_ms": ort, "max_abs_diff": diff})
    return {"model": model_name, "input": f"{c}x{h}x{w}", "reps": reps, "rows": rows}


def deploy_rows(deploy: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "input", "batch", "eager ms", "onnxruntime ms", "eager / onnxruntime", "max abs diff"]
    body = [
        [f"`{deploy['model']}`", deploy["input"], str(r["batch"]), f"{r['eager_ms']:.2f}", f"{r['onnxruntime_ms']:.2f}",
         f"{r['eager_ms'] / r['onnxruntime_ms']:.2f}x", f"{r['max_abs_diff']:.1e}"]
        for r in deploy["rows"]
    ]  # fmt: skip
    return header, body


def deploy_markdown(payload: dict) -> str:
    deploy = payload["deploy"]
    return "\n".join([
        "### Deployment: eager PyTorch against onnxruntime (float32)",
        "",
        f"Command: `{payload['command']}`; {payload['date']}, {payload['machine']['threads']} threads; medians of "
        f"{deploy['reps']} alternating repetitions.",
        "",
        markdown_table(*deploy_rows(deploy)),
        "",
        "Eager: eval mode, no_grad, the 2-D SSM kernels cached. onnxruntime: the file `ssm2d export` writes (each "
        "2-D SSM layer a depthwise convolution with its kernel materialized for the 7 x 7 patch grid), CPU "
        "execution provider, default threads, idle threads not spinning. max abs diff: the largest logit difference "
        "between the two.",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[TARGET_BATCH, 64], help="batch sizes")
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per model")
    parser.add_argument("--pairs", nargs="+", metavar="BASE:SSM", help="model pairs (default: the four of the issue)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="what to measure: the +2-D SSM pairs (table, breakdown, floors), the compiled step, "
                        "the comparators, Mega, deployment (default: all)")
    parser.add_argument("--json", type=Path, default=ROOT / "outputs" / "benchmarks" / "models.json")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the generated sections of the docs")
    parser.add_argument("--render", type=Path, help="rewrite the docs from the JSON of an earlier run")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    args = parser.parse_args()
    if args.render:
        update_docs(json.loads(args.render.read_text()))
        return
    pairs = [tuple(p.split(":", 1)) for p in args.pairs] if args.pairs else PAIRS
    for pair in pairs:
        if len(pair) != 2:
            parser.error(f"--pairs: expected BASE:SSM, got {':'.join(pair)!r}")
    payload: dict = {**run_header("models"), "reps": args.reps, "results": []}
    if "pairs" in args.sections:
        results = run(pairs, args.batches, args.reps)
        parts = breakdown(pairs[0][1], args.batches[0], args.reps)
        print("breakdown (ms):", {k: round(v, 2) if isinstance(v, float) else v for k, v in parts.items()})
        floor_reps = 2 * args.reps  # inference only: twice the repetitions cost little
        payload.update(
            results=results, breakdown=parts, floor_reps=floor_reps,
            floors=[inference_floor(base, ssm, TARGET_BATCH, floor_reps) for base, ssm in pairs],
        )  # fmt: skip
    targets = target_lines(payload["results"])
    if "compile" in args.sections:
        backend = args.compile_backend
        payload["compile"] = [measure_compiled(COMPILE_MODEL, b, args.reps, backend) for b in COMPILE_BATCHES]
        print(text_table(*compile_rows(payload["compile"])))
    if "comparators" in args.sections:
        payload["comparators"] = measure_comparators(COMPARATOR_BATCH, args.reps)
        print(text_table(*comparator_rows(payload["comparators"])))
        targets += comparator_lines(payload["comparators"])
    if "mega" in args.sections:
        payload["mega"] = [mega_measure(batch, args.reps) for batch in args.batches]
        print(text_table(*mega_rows(payload["mega"])))
    if "deploy" in args.sections:
        payload["deploy"] = deploy_benchmark(DEPLOY_MODEL, DEPLOY_BATCHES, 2 * args.reps)
        print(text_table(*deploy_rows(payload["deploy"])))
    report(payload, rows(payload["results"]), targets, args.json, update_docs if args.update_docs else None)


if __name__ == "__main__":
    main()

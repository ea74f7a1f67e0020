"""The study's report, rendered from its study.json alone: `results.md`, one plot per experiment,
and a headline block for the README. Every number comes from a run record; nothing is typed.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .io import write_text_atomic

__all__ = [
    "PAPER_RESULTS", "UNTIMED_NOTE", "arm_rows", "cost_text", "metric", "paired", "render_results",
    "update_generated_block", "verdict",
]  # fmt: skip

# The 2-D SSM paper's own full-scale results (top-1 %): Baron, Zimerman & Wolf, "A 2-Dimensional State
# Space Layer for Spatial Inductive Bias", ICLR 2024, its small-data (CIFAR-100, Tiny-ImageNet) and
# ImageNet-1k result tables.
_SMALL = "Baron et al., ICLR 2024, small-data results (Lee et al.'s recipe)"
_IMAGENET = "Baron et al., ICLR 2024, ImageNet-1k results"
PAPER_RESULTS: list[dict[str, str]] = [
    {"data": "CIFAR-100", "model": "Swin (small-data)", "baseline": "77.98", "with 2-D SSM": "80.12",
     "source": _SMALL},
    {"data": "Tiny-ImageNet", "model": "Swin (small-data)", "baseline": "61.29", "with 2-D SSM": "65.42",
     "source": _SMALL},
    {"data": "CIFAR-100", "model": "their ViT runs / Mega", "baseline": "73.08 (ViT)",
     "with 2-D SSM": "76.02 (Mega + 2-D SSM)", "source": _SMALL},
    {"data": "Tiny-ImageNet", "model": "their ViT runs / Mega", "baseline": "56.53 (ViT)",
     "with 2-D SSM": "57.95 (Mega + 2-D SSM)", "source": _SMALL},
    {"data": "ImageNet-1k", "model": "Mega-Tiny", "baseline": "69.73 (with EMA)", "with 2-D SSM": "70.11",
     "source": _IMAGENET},
]  # fmt: skip

# The commands that would reproduce the papers' small-data runs on a GPU (configs/small_data.yaml).
REPRODUCE = [
    "ssm2d compare configs/small_data.yaml --models swin_sd_32,swin_sd_32_ssm2d --seeds 0,1,2 "
    "--dataset cifar100 --data-dir ~/data/cifar-100-python --output runs/cifar100_swin",
    "ssm2d compare configs/small_data.yaml --models vit_sd_32,vit_sd_32_ssm2d,vit_sd_32_s4nd --seeds 0,1,2 "
    "--dataset cifar100 --data-dir ~/data/cifar-100-python --output runs/cifar100_vit",
    "ssm2d compare configs/small_data.yaml --models vit_sd_64,vit_sd_64_ssm2d --seeds 0,1,2 "
    "--dataset imagefolder --data-dir ~/data/tiny-imagenet-200 --output runs/tiny_imagenet_vit",
    "torchrun --nproc_per_node 8 -m ssm2d compare configs/small_data.yaml --models deit_tiny_224,deit_tiny_224_ssm2d "
    "--dataset imagefolder --data-dir ~/data/imagenet --epochs 300 --output runs/imagenet_deit",
]


def metric(record: dict[str, Any], name: str) -> float | None:
    """`final_acc1`, `best_acc1`, `effective_rank` or `acc1@SIZE` (the primary method) of a run."""
    if name in ("final_acc1", "best_acc1"):
        return record[name]
    evaluations = record.get("evaluations", {})
    if name == "effective_rank":
        return evaluations.get("kernel_rank", {}).get("effective_rank")
    size = int(name.partition("@")[2])
    hits = [r["acc1"] for r in evaluations.get("resolution", []) if r["img_size"] == size and r["method"] != "rate 1"]
    return hits[0] if hits else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def arm_rows(payload: dict[str, Any], experiment: str) -> list[dict[str, Any]]:
    """One row per arm: its finished records, n of m seeds, mean ± std of final top-1, and its cost.

    The cost: "seconds" per epoch is the arm's timed step ("timing" entry of its "timed_as" key, in
    seconds) x its runs' mean steps per epoch, with "timed" True; without a timing entry (or with
    records that lack steps_per_epoch) it is the runs' mean wall time per epoch as they went, with
    "timed" False. "ratio" is the entry's step time over the reference's, None without an entry.
    """
    entries = (payload.get("timing") or {}).get("models", {})
    rows = []
    for arm in payload["experiments"][experiment]["arms"]:
        planned = arm["runs"]
        records = {int(seed): payload["runs"][rid] for seed, rid in planned.items() if rid in payload["runs"]}
        row: dict[str, Any] = {"label": arm["label"], "model": arm["model"], "settings": arm["settings"],
                               "records": records, "n": len(records), "m": len(planned)}  # fmt: skip
        if records:
            recs = list(records.values())
            row["acc"] = _mean_std([r["final_acc1"] for r in recs])
            row["best"] = _mean_std([r["best_acc1"] for r in recs])
            row["params"] = recs[0]["params"]
            entry = entries.get(arm.get("timed_as"))
            row["timed"] = entry is not None and all("steps_per_epoch" in r for r in recs)
            row["seconds"] = (
                entry["step_seconds"] * statistics.fmean(r["steps_per_epoch"] for r in recs) if row["timed"]
                else statistics.fmean(r["epoch_seconds"] for r in recs)
            )  # fmt: skip
            row["ratio"] = None if entry is None else entry["ratio"]
        rows.append(row)
    return rows


def paired(rows: list[dict[str, Any]], a: str, b: str, name: str = "final_acc1") -> dict[str, Any]:
    """The paired difference a - b of `name` over the seeds both arms finished: mean, std, signs."""
    ra, rb = (next(r for r in rows if r["label"] == label) for label in (a, b))
    seeds = sorted(set(ra["records"]) & set(rb["records"]))
    diffs = []
    for seed in seeds:
        va, vb = metric(ra["records"][seed], name), metric(rb["records"][seed], name)
        if va is not None and vb is not None:
            diffs.append(va - vb)
    mean, std = _mean_std(diffs) if diffs else (math.nan, math.nan)
    signs = "".join("+" if d > 0 else "-" if d < 0 else "0" for d in diffs)
    complete = ra["n"] == ra["m"] and rb["n"] == rb["m"]
    return {"a": a, "b": b, "metric": name, "n": len(diffs), "mean": mean, "std": std, "signs": signs,
            "complete": complete and len(diffs) == ra["m"]}  # fmt: skip


def verdict(pair: dict[str, Any], expect: str) -> str:
    """"holds", "does not hold" or "undecided" for one expected relation of a paired difference.

    better: the mean difference is positive and larger than its paired spread (std over seeds).
    not_worse: the mean difference is not below minus that spread.
    With fewer than 2 paired seeds, or seeds still running, the answer is "undecided".
    """
    if not pair["complete"] or pair["n"] < 2:
        return "undecided"
    mean, spread = pair["mean"], pair["std"]
    ok = mean > spread if expect == "better" else mean >= -spread
    return "holds" if ok else "does not hold"


def _fmt_pm(value: tuple[float, float], digits: int = 2) -> str:
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def _extra_columns(payload: dict[str, Any], experiment: str) -> list[str]:
    evaluations = payload["experiments"][experiment]["evaluations"]
    cols = [f"acc1@{s}" for s in evaluations.get("resolution", {}).get("sizes", [])]
    return cols + (["effective_rank"] if "kernel_rank" in evaluations else [])


# The note under a table with an arm that has no timing entry (its s / epoch is marked \*).
UNTIMED_NOTE = (
    "\\* not timed: the wall time of an epoch (training and evaluation) as the runs went, on a machine that may "
    "have had other work; `ssm2d study CONFIG --output DIR --timing` times the arm."
)


def table(payload: dict[str, Any], experiment: str) -> str:
    """The experiment's Markdown table: mean ± std over seeds, n, params, s / epoch (timed; else the
    wall time, marked with an asterisk that `UNTIMED_NOTE` under the table explains), × ref, evaluations."""
    extra = _extra_columns(payload, experiment)
    header = ["arm", "params", "val top-1 % (final)", "val top-1 % (best)", *extra, "s / epoch", "× ref", "n"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    untimed = False
    for row in arm_rows(payload, experiment):
        n = f"{row['n']}" if row["n"] == row["m"] else f"in progress ({row['n']} of {row['m']})"
        if not row["records"]:
            lines.append(f"| `{row['label']}` | | | | {'| ' * len(extra)}| | {n} |")
            continue
        cells = [f"`{row['label']}`", f"{row['params'] / 1e6:.3f}M", _fmt_pm(row["acc"]), _fmt_pm(row["best"])]
        for col in extra:
            values = [v for r in row["records"].values() if (v := metric(r, col)) is not None]
            cells.append(_fmt_pm(_mean_std(values)) if values else "")
        untimed |= not row["timed"]
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
        cells += [f"{row['seconds']:.1f}" + ("" if row["timed"] else "\\*"), ratio, n]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + (f"\n{UNTIMED_NOTE}\n" if untimed else "")


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def cost_text(payload: dict[str, Any]) -> str:
    """What the tables' 's / epoch' and '× ref' columns measure, from the payload's timing object."""
    timing = payload.get("timing")
    if timing is None:
        return (
            "'s / epoch' is the wall time of an epoch (training and evaluation) as the run went, on a machine that "
            "may have had other work: a rough cost (no timing pass yet: `ssm2d study CONFIG --output DIR --timing`)."
        )
    command = timing["command"] or f"ssm2d study {payload['config']} --output DIR --timing"
    return (
        f"'s / epoch' is the training cost of an epoch: the time of one training step (forward, loss, backward and "
        f"optimizer step of the arm's model on one synthetic batch of {timing['batch_size']} images; no data "
        "loading, no evaluation) times the run's steps per epoch. The steps are timed side by side, not during "
        f"the runs: a timing pass builds every model, runs {_count(timing['warmup'], 'warm-up step')} of each, "
        f"then {_count(timing['rounds'], 'round')} that each time, model after model, "
        f"{_count(timing['steps'], 'step')} of `{timing['reference']}` and then as many of the model, at "
        f"{timing['threads']} threads. '× ref' is the median over rounds of the model's step time over "
        f"`{timing['reference']}`'s just before it (the machine's speed drifts from minute to minute, little within "
        f"seconds), and a step's time is that ratio times `{timing['reference']}`'s fastest step in the pass. Last "
        f"timing pass: `{command}`."
    )


def _pair_text(pair: dict[str, Any], expect: str) -> str:
    unit = "" if pair["metric"] == "effective_rank" else " points"
    what = {"better": "above", "not_worse": "not below"}[expect]
    if pair["n"] == 0:
        numbers = "no paired seeds yet"
    else:
        seeds = "1 seed" if pair["n"] == 1 else f"{pair['n']} seeds"
        numbers = f"{pair['mean']:+.2f} ± {pair['std']:.2f}{unit} over {seeds} (per seed: {pair['signs']})"
    return f"`{pair['a']}` - `{pair['b']}` ({pair['metric']}; expected {what}): {numbers}: **{verdict(pair, expect)}**"


def summary_sentence(payload: dict[str, Any], experiment: str) -> str:
    """One plain sentence: does the experiment's claim hold at this scale, from its pairs."""
    exp = payload["experiments"][experiment]
    rows = arm_rows(payload, experiment)
    if not exp["pairs"]:
        return "No paired comparison is configured for this experiment."
    results = [(p, verdict(paired(rows, p["a"], p["b"], p["metric"]), p["expect"])) for p in exp["pairs"]]
    if any(v == "undecided" for _, v in results):
        done, planned = sum(r["n"] for r in rows), sum(r["m"] for r in rows)
        if done == planned:
            return "Not decided: with one seed per arm a difference cannot be told from seed noise."
        return f"Not decided yet: {done} of {planned} runs finished."
    failed = [p for p, v in results if v == "does not hold"]
    if not failed:
        return (
            "The claim holds at this scale: every paired comparison goes the expected way by more than its seed spread."
        )
    names = "; ".join(f"`{p['a']}` vs `{p['b']}`" for p in failed)
    return f"The claim does not hold at this scale: {names} did not go the expected way by more than the seed spread."


def _plot(payload: dict[str, Any], experiment: str, path: Path) -> None:
    exp = payload["experiments"][experiment]
    rows = [r for r in arm_rows(payload, experiment) if r["records"]]
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if exp["plot"] == "train_fraction":
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = sorted((r["settings"].get("train_fraction", payload["recipe"].get("train_fraction", 1.0)), r["acc"])
                         for r in rows if r["model"] == model)  # fmt: skip
            ax.errorbar([x for x, _ in pts], [a[0] for _, a in pts], [a[1] for _, a in pts], marker="o", capsize=3,
                        label=model)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("train fraction")
    elif exp["plot"] == "resolution":
        sizes = exp["evaluations"]["resolution"]["sizes"]
        for r in rows:
            evaluated = [e for rec in r["records"].values() for e in rec["evaluations"].get("resolution", [])]
            if not evaluated:
                continue
            xs, ys, es = [evaluated[0]["train_size"]], [r["acc"][0]], [r["acc"][1]]
            for size in sizes:
                values = [v for rec in r["records"].values() if (v := metric(rec, f"acc1@{size}")) is not None]
                if values:
                    xs.append(size)
                    ys.append(_mean_std(values)[0])
                    es.append(_mean_std(values)[1])
            ax.errorbar(xs, ys, es, marker="o", capsize=3, label=r["label"])
        ax.set_xlabel("input size at evaluation (trained at the first)")
    elif exp["plot"] == "spectrum":
        for r in rows:
            rec = r["records"][min(r["records"])]
            for layer in rec["evaluations"].get("kernel_rank", {}).get("layers", []):
                (line,) = ax.plot(range(1, len(layer["spectrum"]) + 1), layer["spectrum"], marker=".", alpha=0.8,
                                  label=f"{r['label']}: {layer['name']}")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("singular value index (mean over channels, seed of the first run)")
        ax.set_ylabel("s_i / s_1")
    else:
        xs = range(len(rows))
        ax.bar(xs, [r["acc"][0] for r in rows], yerr=[r["acc"][1] for r in rows], capsize=3, color="#8fb3d9")
        for x, r in zip(xs, rows, strict=True):
            ax.plot([x] * r["n"], [rec["final_acc1"] for rec in r["records"].values()], "k.", markersize=4)
        ax.set_xticks(list(xs), [r["label"] for r in rows], rotation=40, ha="right", fontsize=7)
        low = min(rec["final_acc1"] for r in rows for rec in r["records"].values())
        ax.set_ylim(max(0.0, low - 5), None)
    if exp["plot"] != "spectrum":
        ax.set_ylabel("validation top-1 (%)")
    if exp["plot"] != "bars" and rows:
        ax.legend(fontsize=6)
    what = "singular values of the learned 2-D kernels" if exp["plot"] == "spectrum" else "mean ± std over seeds"
    ax.set_title(f"{experiment} ({what})", fontsize=10)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _experiment_section(payload: dict[str, Any], experiment: str, img: Path, img_link: str) -> str:
    exp = payload["experiments"][experiment]
    rows = arm_rows(payload, experiment)
    parts = [f"## {experiment}", "", f"**Claim.** {exp['claim']}", "", table(payload, experiment)]
    if any(r["records"] for r in rows):
        _plot(payload, experiment, img / f"{experiment}.png")
        parts += [f"![{experiment}]({img_link}/{experiment}.png)", ""]
    if exp["pairs"]:
        parts.append("Paired over seeds (a - b; mean ± std of the per-seed differences):")
        parts.append("")
        for p in exp["pairs"]:
            parts.append("- " + _pair_text(paired(rows, p["a"], p["b"], p["metric"]), p["expect"]))
        parts.append("")
    parts += [f"**Verdict.** {summary_sentence(payload, experiment)}", ""]
    return "\n".join(parts)


def _papers_section() -> str:
    lines = ["## The papers' own numbers, at full scale", "",
             "| data | model | baseline top-1 % | with the 2-D SSM top-1 % | source |", "|---|---|---:|---:|---|"]
    lines += [f"| {r['data']} | {r['model']} | {r['baseline']} | {r['with 2-D SSM']} | {r['source']} |"
              for r in PAPER_RESULTS]  # fmt: skip
    lines += ["", "The same comparisons with this library on a GPU (the paper's small-data recipe, "
              "`configs/small_data.yaml`; ImageNet with its own epochs):", "", "```bash", *REPRODUCE, "```", ""]
    return "\n".join(lines)


def headline(payload: dict[str, Any], link: str) -> str:
    """The README block: the spatial-layer table (or the first experiment's) and every verdict."""
    names = list(payload["experiments"])
    main = "spatial_layers" if "spatial_layers" in names else names[0]
    verdicts = "\n".join(f"- `{n}`: {summary_sentence(payload, n)}" for n in names)
    return (
        f"From `{payload['command'] or 'ssm2d study ' + payload['config']}`; the full report with plots and paired "
        f"comparisons is [{link}]({link}).\n\n{table(payload, main)}\n{verdicts}\n"
    )


def update_generated_block(path: Path, name: str, body: str) -> None:
    """Replace the text between `<!-- BEGIN name (generated, do not edit) -->` and `<!-- END name -->`
    in `path` (the markers of benchmarks/_report.py). Without them, the block goes right under the
    `## Results` heading, or at the end of the file if there is none."""
    begin, end = f"<!-- BEGIN {name} (generated, do not edit) -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    heading = re.compile(r"^## Results\n\n", re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    elif heading.search(text):
        text = heading.sub(lambda m: m.group(0) + block + "\n\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(path, text)


def render_results(payload: dict[str, Any], docs: str | Path, readme: str | Path | None = None) -> Path:
    """Write `docs/results.md`, `docs/img/<experiment>.png` and `docs/results.json` from `payload`;
    with `readme`, also its `study-results` block. Returns the path of results.md."""
    docs = Path(docs)
    runs = payload["runs"]
    recipe = ", ".join(f"{k} {v}" for k, v in payload["recipe"].items())
    val_fraction = payload["recipe"].get("val_fraction", 1.0)
    images = "the test set" if val_fraction == 1 else f"a class-balanced {val_fraction} of the test set"
    planned = {r for e in payload["experiments"].values() for a in e["arms"] for r in a["runs"].values()}
    unfinished = len(planned - set(runs))
    running = (
        f" {unfinished} of {len(planned)} runs are still to come: their arms are marked 'in progress (n of m)' and "
        "their comparisons are undecided." if unfinished else ""
    )
    intro = [
        "# Results", "",
        "<!-- generated by `ssm2d study --render-only` from results.json, do not edit -->", "",
        f"Every number below comes from a run record of [results.json](results.json), written by "
        f"`{payload['command'] or 'ssm2d study ' + payload['config']}` ({len(runs)} finished runs; "
        f"{'QUICK smoke run, not a result' if payload['quick'] else 'seeds ' + str(payload['seeds'])}). "
        f"One recipe for every arm: {recipe}. Accuracies are on {images}, mean ± std over seeds; "
        f"'final' is the last epoch, 'best' the best epoch (optimistic). {cost_text(payload)} The layers' own "
        f"timings are in [benchmarks.md](benchmarks.md).{running}", "",
    ]  # fmt: skip
    sections = [_experiment_section(payload, name, docs / "img", "img") for name in payload["experiments"]]
    text = "\n".join(intro) + "\n" + "\n".join(sections) + "\n" + _papers_section()
    path = write_text_atomic(docs / "results.md", text)
    write_text_atomic(docs / "results.json", json.dumps(payload, indent=1) + "\n")
    if readme is not None:
        update_generated_block(Path(readme), "study-results", headline(payload, f"{docs.name}/results.md"))
    return path

"""Shared output of the benchmark scripts: timing, tables, JSON, and generated doc sections."""

from __future__ import annotations

import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from ssm2d.train.study_report import update_generated_block

ROOT = Path(__file__).resolve().parent.parent


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall time of `fn` in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        if found:
            cpu = found.group(1).strip()
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run_header(benchmark: str) -> dict[str, object]:
    """The fields every benchmark JSON starts with: its name, the command line, UTC date, machine."""
    return {
        "benchmark": benchmark,
        "command": "python " + " ".join([f"benchmarks/{benchmark}.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
    }


def status_kb(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, VmSize) in kB. VmHWM is the peak of
    this process image only; `ru_maxrss` would also count the parent's memory at fork."""
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if found is None:
        raise RuntimeError(f"no {field} in /proc/self/status: peak memory is measured on Linux only")
    return int(found.group(1))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def run_line(command: str, payload: dict, details: str = "") -> str:
    """The opening of a README block: the command that measured it, when, the `details` of the
    measurement, and on how many threads (no closing punctuation)."""
    details = f"{details}, " if details else ""
    return f"`{command}` ({payload['date']}, {details}float32, {payload['machine']['threads']} CPU threads)"


def update_section(path: Path, name: str, body: str) -> None:
    """Replace the text between `<!-- BEGIN name -->` and `<!-- END name -->` (the library's
    generated-block writer, shared with `ssm2d study`)."""
    update_generated_block(path, name, body)


def update_docs_and_readme(section: str, docs_body: str, readme_body: str) -> None:
    """Rewrite section `section` of docs/benchmarks.md and `section`-results of README.md."""
    update_section(ROOT / "docs" / "benchmarks.md", section, docs_body)
    update_section(ROOT / "README.md", f"{section}-results", readme_body)
    print("updated docs/benchmarks.md and README.md")


def report(
    payload: dict,
    table: tuple[Sequence[str], Sequence[Sequence[str]]],
    targets: Sequence[str],
    json_path: Path,
    update_docs: Callable[[dict], None] | None = None,
) -> None:
    """Print the table (unless it has no rows) and the target verdicts, write the JSON and, if
    asked, the docs."""
    if table[1]:
        print(text_table(*table))
    print("\n".join(targets))
    write_json(json_path, payload)
    print(f"wrote {json_path}")
    if update_docs is not None:
        update_docs(payload)

"""Put the result of an `ssm2d compare` run (its compare.json) into docs/benchmarks.md and README.md.

The numbers come from the run itself (`make demo` writes outputs/demo/compare.json); this script
only renders them, with the command that produced them, so that no accuracy is typed by hand.

    python benchmarks/compare_table.py outputs/demo/compare.json                # print the table
    python benchmarks/compare_table.py outputs/demo/compare.json --update-docs  # also rewrite the docs
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

# This folder holds a script named like the package: take it off the path before importing.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
from ssm2d.train import format_table  # noqa: E402

sys.path.append(str(_HERE))
from _report import ROOT, update_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path, help="compare.json of an `ssm2d compare` run")
    parser.add_argument("--section", default="demo", help="name of the generated block (default: demo)")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the block in docs/benchmarks.md and README.md")
    args = parser.parse_args()
    if not args.result.is_file():
        parser.error(f"result: expected a compare.json written by `ssm2d compare`, but {args.result} does not exist")
    payload = json.loads(args.result.read_text())
    if not payload.get("command"):
        parser.error(f"result: {args.result} does not record the command that produced it; re-run `ssm2d compare`")
    table = format_table(payload["rows"])
    print(table, end="")
    if not args.update_docs:
        return
    written = datetime.fromtimestamp(args.result.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    intro = (
        f"Command: `{payload['command']}` (finished {written}; {payload['header']}), "
        f"rendered by `python benchmarks/compare_table.py {args.result} --update-docs`."
    )
    for doc in (ROOT / "docs" / "benchmarks.md", ROOT / "README.md"):
        update_section(doc, f"{args.section}-results", f"{intro}\n\n{table}")
    print("updated docs/benchmarks.md and README.md")


if __name__ == "__main__":
    main()

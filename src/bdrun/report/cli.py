"""`bdrun-report PATH`: rebuild summary.csv, summary.md and figures/ from a folder of runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bdrun.report.console import print_sweep
from bdrun.report.summary import SUMMARY_MD, summarize


def main(argv: list[str] | None = None) -> None:
    """`bdrun-report PATH`: rebuild summary.csv, summary.md and figures/ from a folder of runs."""
    parser = argparse.ArgumentParser(
        prog="bdrun-report",
        description="Summarise a folder of bdrun runs (a sweep, or any folder holding run "
        "folders with results.json): summary.csv, summary.md, heatmaps, attack x defense matrix.",
    )
    parser.add_argument("path", type=Path, help="folder to search for run folders")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    if not args.path.is_dir():
        print(f"bdrun-report: error: {args.path} is not a folder", file=sys.stderr)
        sys.exit(2)
    summary = summarize(args.path, figures=not args.no_figures)
    if not summary.records:
        print(
            f"bdrun-report: error: no run folders (results.json or error.json) under {args.path}",
            file=sys.stderr,
        )
        sys.exit(2)
    print_sweep(summary)
    if summary.failed:
        print(f"bdrun-report: {len(summary.failed)} job(s) failed; see {args.path / SUMMARY_MD}")


if __name__ == "__main__":
    main()

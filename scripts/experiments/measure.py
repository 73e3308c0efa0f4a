"""Shared code of the scripts in scripts/experiments/: run a page's bdrun sweeps, read their
results.json files back, print the page's table in markdown.

Each sweep is one `bdrun -m OVERRIDES trainer.num_threads=N logger=none hydra.sweep.dir=...`
subprocess, the command a user would type. The model cache is fresh per thread count (a folder
under the output folder, not $BDRUN_CACHE): the cache key does not hold the thread count, and
some figures differ between one and two threads.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdrun.report.collect import JobRecord, collect

ROOT = Path(__file__).resolve().parents[2]


def merged(*parts: str | Sequence[str]) -> tuple[str, ...]:
    """Overrides in order, a later `key=value` replacing an earlier one of the same key (bdrun
    takes each key once)."""
    flat = [o for part in parts for o in ([part] if isinstance(part, str) else part)]
    out: dict[str, str] = {}
    for override in flat:
        out[override.split("=", 1)[0]] = override
    return tuple(out.values())


@dataclass(frozen=True)
class Sweep:
    """One `bdrun -m` command of a page: its folder name, overrides (a later key replaces an
    earlier one) and thread count."""

    name: str
    overrides: tuple[str, ...]
    threads: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", merged(self.overrides))

    def arguments(self, out: Path) -> list[str]:
        """bdrun's arguments (after `bdrun`) for this sweep, writing under `out`."""
        return [
            "-m",
            *self.overrides,
            f"trainer.num_threads={self.threads}",
            "logger=none",
            f"hydra.sweep.dir={out / self.name}",
        ]

    def command(self, out: Path) -> str:
        """The sweep as a shell command line."""
        return shlex.join(["bdrun", *self.arguments(out)])


def parser(description: str, script: str) -> argparse.ArgumentParser:
    """The options every experiment script takes."""
    stem = Path(script).stem
    parse = argparse.ArgumentParser(description=description)
    parse.add_argument(
        "--out",
        type=Path,
        default=ROOT / "outputs" / "experiments" / stem,
        help="folder for the sweeps and their model cache (default: outputs/experiments/%(prog)s)",
    )
    parse.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parse.add_argument(
        "--report-only", action="store_true", help="print the tables from an earlier --out"
    )
    parse.add_argument("--only", nargs="+", metavar="NAME", help="run only these sweeps")
    parse.add_argument(
        "--extra",
        nargs="+",
        default=[],
        metavar="OVERRIDE",
        help="overrides added to every sweep (e.g. debug=smoke to check the commands quickly)",
    )
    return parse


def run_sweeps(sweeps: Sequence[Sweep], args: argparse.Namespace) -> dict[str, list[JobRecord]]:
    """Run the sweeps (or print them with --dry-run) and return each one's job records (none
    for a sweep left out by --only)."""
    out: Path = args.out.resolve()
    chosen = [s for s in sweeps if not args.only or s.name in args.only]
    chosen = [Sweep(s.name, merged(s.overrides, args.extra), s.threads) for s in chosen]
    records: dict[str, list[JobRecord]] = defaultdict(list)  # sweeps not run: no jobs
    for sweep in chosen:
        cache = out / "cache" / f"threads-{sweep.threads}"
        if args.dry_run:
            print(f"BDRUN_CACHE={cache} {sweep.command(out)}")
            continue
        if not args.report_only:
            started = time.monotonic()
            print(f"== {sweep.name}: {sweep.command(out)}", file=sys.stderr, flush=True)
            env = {**os.environ, "BDRUN_CACHE": str(cache)}
            command = [sys.executable, "-m", "bdrun.cli", *sweep.arguments(out)]
            done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=False)
            elapsed = time.monotonic() - started
            print(f"   exit {done.returncode}, {elapsed:.0f} s", file=sys.stderr, flush=True)
        records[sweep.name] = collect(out / sweep.name) if (out / sweep.name).is_dir() else []
    return records


def measured_runs(
    sweeps: Sequence[Sweep], doc: str | None, script: str
) -> dict[str, list[JobRecord]] | None:
    """A script's start: read its options, run (or print) its sweeps; their records, or None
    after --dry-run (nothing to tabulate)."""
    args = parser((doc or "").split("\n\n")[0], script).parse_args()
    runs = run_sweeps(sweeps, args)
    return None if args.dry_run else runs


def pick(records: Iterable[JobRecord], **params: Any) -> dict[str, Any] | None:
    """results.json of the one finished job whose overrides hold every `key=value` given (dots
    in keys written as `__`; values compared as lower-case text: Hydra writes `true` as
    `True`), or None."""
    wanted = {key.replace("__", "."): str(value).lower() for key, value in params.items()}
    found = [
        r
        for r in records
        if r.results is not None
        and all(str(r.params.get(k)).lower() == v for k, v in wanted.items())
    ]
    if len(found) > 1:
        raise ValueError(f"{len(found)} jobs match {wanted}")
    return found[0].results if found else None


def labelled_results(
    runs: dict[str, list[JobRecord]], rows: Iterable[tuple[str, str, dict[str, Any]]]
) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(label, results) of each page row (label, sweep, {override key: value}) whose sweep ran."""
    for label, sweep, keys in rows:
        if sweep in runs:
            yield label, pick(runs[sweep], **{k.replace(".", "__"): v for k, v in keys.items()})


def metric(results: dict[str, Any] | None, *path: str) -> Any:
    """results["metrics"][path...], or None where the job or the key is missing."""
    node: Any = (results or {}).get("metrics")
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def pct(value: float | None, digits: int = 1) -> str:
    """A fraction as a percentage without the sign ('-' when missing)."""
    return "-" if value is None else f"{100 * value:.{digits}f}"


def num(value: float | None, digits: int = 2) -> str:
    """A number rounded for a table (integers as they are, '-' when missing)."""
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def show(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print a titled markdown table."""
    print(f"\n{title}\n\n{table(header, list(rows))}", flush=True)

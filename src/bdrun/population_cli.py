"""`bdrun-population NAME [OVERRIDES]`: build, inspect and score a model population in one
command; `bdrun-population --score DIR` scores a population folder again.

`bdrun-population digits hydra/launcher=local` runs the sweep

    bdrun -m population=digits population.member=range(0,N) defense=<inspectors> OVERRIDES

(N = population.clean + population.backdoored, the inspectors from population.inspectors), in
the population's fixed folder (hydra.sweep.dir, default outputs/population/<name>): each job is
one (member, inspector) pair, models train through the model cache, a rerun skips the jobs that
finished, and the sweep ends by scoring the population (bdrun.report.population). Any launcher
works: hydra/launcher=local (joblib), hydra/launcher=slurm.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bdrun.errors import BdrunError


def sweep_arguments(name: str, overrides: list[str]) -> list[str]:
    """The `bdrun -m` arguments of the population sweep (module docstring)."""
    from bdrun.cli import check_overrides
    from bdrun.population import member_count

    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in ("population", "population.member", "defense", "-m", "--multirun"):
            raise BdrunError(
                f"{override!r}: bdrun-population sets the population, its members and the "
                "inspectors itself; change population.inspectors or the population's counts"
            )
    cfg = check_overrides([f"population={name}", *overrides])  # one line for a bad name or key
    size = member_count(cfg.population)
    inspectors = ",".join(str(i) for i in cfg.population.inspectors)
    return [
        "-m",
        f"population={name}",
        f"population.member=range(0,{size})",
        f"defense={inspectors}",
        *overrides,
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="bdrun-population",
        description="Build a population of clean and backdoored models from conf/population/"
        "NAME.yaml, inspect each with every inspector and score the inspectors (AUROC, "
        "cross-entropy, TPR at 5 %% FPR, target accuracy, cost), overall and per family.",
    )
    parser.add_argument("name", nargs="?", help="population config (conf/population/NAME.yaml)")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for bdrun")
    parser.add_argument("--score", type=Path, metavar="DIR", help="only score this folder")
    args = parser.parse_args(argv)
    try:
        if args.score is not None:
            from bdrun.report.population import TABLE_MD, score_population

            score_population(args.score)
            print(f"population scores: {args.score / TABLE_MD}")
            return
        if not args.name:
            raise BdrunError("name a population (conf/population/NAME.yaml) or give --score DIR")
        arguments = sweep_arguments(args.name, args.overrides)
    except BdrunError as err:
        print(f"bdrun-population: error: {err}", file=sys.stderr)
        sys.exit(2)
    from bdrun import cli

    sys.argv = ["bdrun", *arguments]
    cli.main()


if __name__ == "__main__":
    main()

"""Reports: the console summary of a run; tables, plots and multirun aggregation.

`load_runs(folder)` reads any folder of runs (a sweep, a population) as a pandas DataFrame, one
row per run with results.json flattened (bdrun.report.frame).
"""

from bdrun.report.frame import load_runs

__all__ = ["load_runs"]

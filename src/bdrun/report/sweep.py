"""The end of a multirun: a Hydra callback that writes the sweep summary, and the sweep outcome.

conf/config.yaml registers `SweepSummary` under hydra.callbacks. When the sweep starts it notes
the sweep folder and the job list; when it ends it writes summary.csv, summary.md and figures/
(bdrun.report.summary), prints a short table and, with logger=wandb, logs the summary table
and heatmaps to a "summary" run in the sweep's wandb group. The CLI then reads `STATE` to end a
sweep with failed jobs in one clear error and a non-zero exit status.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bdrun.report.collect import ERROR_FILE, WANDB_SUMMARY_DIR, Summary
from bdrun.report.summary import summarize
from bdrun.results import write_json_atomic

log = logging.getLogger(__name__)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
KEEP_ON_FAILURE = {".hydra", "bdrun.log", ERROR_FILE}


@dataclass
class SweepState:
    """What the driver process knows about the sweep it runs."""

    sweep_dir: Path | None = None
    expected: list[list[str]] | None = None
    logger: dict[str, Any] | None = None
    slurm: bool = False
    summary: Summary | None = None
    population: bool = False  # a population sweep: its scores are written at the end too


STATE = SweepState()


def expected_jobs(config: DictConfig) -> list[list[str]] | None:
    """The overrides of every job, by job number, for Hydra's basic sweeper (else None)."""
    if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    try:
        overrides = OverridesParser.create().parse_overrides(arguments)
        batches = BasicSweeper.split_arguments(overrides, None)
    except Exception as err:  # the sweeper reports unreadable overrides itself
        log.debug("could not list the sweep's jobs: %s", err)
        return None
    return [list(job) for batch in batches for job in batch]


class SweepSummary(Callback):
    """Hydra callback: summary files and console table when a multirun ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        STATE.sweep_dir = Path(str(config.hydra.sweep.dir))
        STATE.expected = expected_jobs(config)
        STATE.summary = None
        logger = config.get("logger")
        STATE.logger = OmegaConf.to_container(logger, resolve=True) if logger else None
        target = str(config.hydra.launcher.get("_target_", ""))
        STATE.slurm = target.endswith("SlurmLauncher")
        STATE.population = config.get("population") is not None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finish_sweep()


def finish_sweep() -> Summary | None:
    """Summarise the sweep folder (once), print it, log it to wandb; the summary or None."""
    if STATE.sweep_dir is None or not STATE.sweep_dir.is_dir():
        return None
    summary = summarize(STATE.sweep_dir, STATE.expected)
    STATE.summary = summary
    if STATE.slurm:
        annotate_slurm_states(summary)
    if summary.records:
        from bdrun.report.console import print_sweep  # rich: only when a sweep has jobs

        print_sweep(summary)
        log_to_wandb(summary)
    if STATE.population and summary.done:
        score_population_sweep(STATE.sweep_dir)
    return summary


def score_population_sweep(root: Path) -> None:
    """A population sweep's detection scores (bdrun.report.population); a failure to score is
    reported, never a reason to lose the sweep's summary."""
    from bdrun.errors import BdrunError
    from bdrun.report.population import TABLE_MD, score_population

    try:
        score_population(root, STATE.logger)
    except BdrunError as err:
        print(f"bdrun: population not scored: {err}")
        return
    except Exception as err:  # Hydra would swallow it: say so, and how to score it later
        log.exception("population scoring failed")
        print(
            f"bdrun: population not scored ({type(err).__name__}: {err}); score it with "
            f"bdrun-population --score {root}"
        )
        return
    print(f"population scores: {root / TABLE_MD}")


def write_job_error(run_dir: Path, err: BaseException, overrides: list[str], job_num: Any) -> None:
    """Keep a failed job's folder as a record: its Hydra config, log and error.json; anything
    half-written (curves, figures) is removed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for child in run_dir.iterdir():
        if child.name not in KEEP_ON_FAILURE:
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    write_json_atomic(
        run_dir / ERROR_FILE,
        {
            "status": "failed",
            "job": job_num,
            "overrides": overrides,
            "type": type(err).__name__,
            "error": message,
            "traceback": "".join(traceback.format_exception(err)),
        },
    )


def failure_lines(summary: Summary | None, launcher_error: str | None = None) -> list[str]:
    """One line per failed or missing job (job number, overrides, why)."""
    lines = []
    for record in summary.failed if summary else []:
        lines.append(f"job {record.job_num} ({' '.join(record.overrides)}): {record.error}")
    if launcher_error:
        short = launcher_error if len(launcher_error) <= 200 else launcher_error[:197] + "..."
        lines.append(f"the launcher stopped: {short}" if lines else short)
    return lines


def annotate_slurm_states(summary: Summary) -> None:
    """Give missing jobs of a Slurm sweep their Slurm state (CANCELLED, TIMEOUT, ...)."""
    if STATE.sweep_dir is None:
        return
    jobs = submitit_jobs(STATE.sweep_dir)
    for record in summary.records:
        job = jobs.get(record.job_num)
        if record.status == "missing" and job is not None:
            try:
                state = job.state
            except Exception:  # sacct unavailable: keep the generic reason
                continue
            record.error = f"Slurm job {job.job_id} ended {state} without results"


def submitit_jobs(sweep_dir: Path) -> dict[int, Any]:
    """Slurm jobs of the newest array submitted from this sweep folder, by task index (which
    is the Hydra job number for a single batch)."""
    folder = sweep_dir / ".submitit"
    if not folder.is_dir():
        return {}
    import submitit

    ids = [p.name for p in folder.iterdir() if re.fullmatch(r"\d+_\d+", p.name)]
    if not ids:
        return {}
    newest = max(int(i.split("_")[0]) for i in ids)
    jobs = {}
    for job_id in ids:
        array, task = (int(x) for x in job_id.split("_"))
        if array == newest:
            jobs[task] = submitit.SlurmJob(folder=folder / "%j", job_id=job_id)
    return jobs


def wait_for_slurm_jobs(poll_s: float = 2.0) -> None:
    """After the launcher gave up on one job (cancelled, failed), wait for the sweep's other
    Slurm jobs to end, so the summary covers them."""
    if not STATE.slurm or STATE.sweep_dir is None:
        return
    pending = list(submitit_jobs(STATE.sweep_dir).values())
    while pending:
        pending = [job for job in pending if not job.done()]
        if pending:
            time.sleep(poll_s)


def log_to_wandb(summary: Summary) -> None:
    """With logger=wandb: the summary table and figures in a "summary" run of the sweep group."""
    node = dict(STATE.logger or {})
    if node.pop("kind", None) != "wandb" or STATE.sweep_dir is None:
        return
    from bdrun.loggers import WandbRunLogger, sweep_group

    node["group"] = node.get("group") or sweep_group(STATE.sweep_dir)
    node["name"] = "summary"
    try:
        folder = summary.root / WANDB_SUMMARY_DIR
        folder.mkdir(exist_ok=True)
        logger = WandbRunLogger(
            folder,
            {"sweep_dir": str(summary.root), "jobs": len(summary.records)},
            **node,
        )
    except Exception as err:  # wandb must never fail a sweep
        log.warning("wandb summary not logged: %s", err)
        return
    try:
        rows = json.loads(json.dumps(_table_rows(summary), default=str))
        if rows:
            columns = list(rows[0])
            logger.log_table("summary", columns, [[r.get(c) for c in columns] for r in rows])
        for path in summary.files:
            if path.suffix == ".png":
                logger.log_image(f"sweep/{path.stem}", path)
    finally:
        logger.finish()


def _table_rows(summary: Summary) -> list[dict[str, Any]]:
    from bdrun.report.table import job_row

    return [job_row(r, summary.swept) for r in summary.records]

"""The `bdrun` command: Hydra composes the config, bdrun.tuning applies the tuning files, and
runner.run executes it.

Before Hydra sees the command line, two conveniences are applied:
- `defense=[a,b]` (stacked defenses) becomes `defense=a +defense@defense_stack.b=b`, because
  Hydra would otherwise merge both configs into one node (bdrun.compose);
- the config is composed once, so a typo in a group option or a key ends in one line listing
  the valid options.
`bdrun --cfg job` prints the config with its tuning applied (what the run executes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from bdrun import tuning
from bdrun.compose import apply_job, compose_with_hydra, rewrite_defense_stack
from bdrun.errors import BdrunError, TrainingInterrupted
from bdrun.tuning import USER_GROUPS, apply_tuning

CONF_DIR = str(tuning.CONF_DIR)


# launchers Hydra and the installed launcher plugins provide (conf/hydra/launcher/ adds ours)
PLUGIN_LAUNCHERS = ("basic", "joblib", "submitit_local", "submitit_slurm")


def group_options(group: str) -> list[str]:
    folder = Path(CONF_DIR) / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


HYDRA_FLAGS_WITH_VALUE = (
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--info",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--shell-completion",
    "-sc",
)


def split_overrides(args: list[str]) -> list[str]:
    """The override arguments of a command line, without Hydra's own flags and their values."""
    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in HYDRA_FLAGS_WITH_VALUE and arg not in ("--info",)
        else:
            overrides.append(arg)
    return overrides


def check_overrides(args: list[str]) -> DictConfig:
    """Compose the config once before Hydra runs, so that bad group options, unknown keys and
    unreadable overrides end in one line; return it (`hydra` node included, tuning applied to the
    rest). Sweeps are checked with their first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    reduced = []
    for arg in split_overrides(args):
        if arg.startswith("hydra/launcher="):
            launcher = arg.split("=", 1)[1]
            options = sorted({*PLUGIN_LAUNCHERS, *group_options("hydra/launcher")})
            if launcher not in options:
                raise BdrunError(
                    f"unknown hydra/launcher {launcher!r}; choose one of: {', '.join(options)}"
                )
        if arg.split("=", 1)[0] in OUTPUT_DIR_KEYS:
            reduced.append(arg)  # checked by check_output_dir
        if arg.startswith(("hydra.", "hydra/", "+hydra", "~hydra", "++hydra")):
            continue  # Hydra's own settings: Hydra reports on those
        try:
            override = parser.parse_override(arg)
        except HydraException as err:
            raise BdrunError(
                f"cannot read the override {arg!r}: {str(err).splitlines()[0]}"
            ) from None
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [None]
        group = override.key_or_group
        if group in USER_GROUPS and not override.is_delete():
            options = group_options(group)
            for value in values if values != [None] else [override.value()]:
                if isinstance(value, str | int | float) and str(value) not in options:
                    raise BdrunError(
                        f"unknown {group} {str(value)!r}; choose one of: {', '.join(options)}"
                    )
        if values == [None]:
            reduced.append(arg)
        elif values:
            prefix = arg.split("=", 1)[0]
            reduced.append(f"{prefix}={values[0]}")
    try:
        composed = compose_with_hydra(reduced)
    except HydraException as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        key = message.split("'")[1] if message.startswith("Could not override '") else None
        if key:
            raise BdrunError(
                f"unknown config key {key!r}; check its spelling (bdrun --cfg job shows every key) or add it with +{key}=..."
            ) from None
        raise BdrunError(message) from None
    apply_job(composed, dict(composed.hydra.runtime.choices), reduced)
    return composed


OUTPUT_DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir")
INFO_FLAGS = ("--help", "-h", "--hydra-help", "--shell-completion", "-sc", "--info", "-i")


def flag_value(args: list[str], *names: str) -> str | None:
    """The value after the first of `names` among args (`--cfg job`), else None."""
    for i, arg in enumerate(args[:-1]):
        if arg in names:
            return args[i + 1]
    return None


def print_job_config(composed: DictConfig, resolve: bool) -> None:
    """`bdrun --cfg job`: the config the run executes, tuning applied (Hydra's own printout
    would show it without the tuning files)."""
    job = OmegaConf.masked_copy(composed, [k for k in composed if k != "hydra"])
    print(OmegaConf.to_yaml(job, resolve=resolve), end="")


def check_output_dir(folder: str, key: str) -> None:
    """A one-line BdrunError when the run (or sweep) folder cannot be created; the folders this
    check creates are removed again (Hydra makes them when the run starts)."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise BdrunError(f"{key}={folder} is a file, not a folder; choose another {key}")
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=path))
    except OSError as err:
        raise BdrunError(
            f"{key}={folder} cannot be created or written ({err.strerror}); choose a writable folder"
        ) from None
    finally:
        for created in missing:
            with contextlib.suppress(OSError):
                created.rmdir()


def _discard(run_dir: Path) -> None:
    """Remove the folder of a run that failed on a user error, and empty parents under outputs/."""
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent.name and parent.name != "outputs" and parent.exists():
        try:
            parent.rmdir()  # only succeeds when empty
        except OSError:
            break
        parent = parent.parent


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _task(cfg: DictConfig) -> float | None:
    from bdrun import population
    from bdrun.report.console import print_summary
    from bdrun.runner import run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        try:
            overrides = list(hydra_cfg.overrides.task)
            if population.is_member(cfg):
                results = _population_job(cfg, hydra_cfg, run_dir, overrides)
            else:
                apply_tuning(cfg, hydra_cfg.runtime.choices, overrides)
                results = run(cfg, run_dir)
        except MissingMandatoryValue as err:
            raise BdrunError(
                f"{err.full_key} has no value; set it, e.g. {err.full_key}=..."
            ) from None
    except BdrunError as err:
        if multirun:
            _job_failed(run_dir, err)
            if isinstance(err, TrainingInterrupted):
                _stop_sweep()
            return None
        _discard(run_dir)
        print(f"bdrun: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if not multirun:
            raise
        logging.getLogger("bdrun").exception("job failed")  # the traceback, in the job's log
        return _job_failed(run_dir, err)
    print_summary(results, run_dir)
    return results["metrics"]["after"]["asr"]


def _population_job(
    cfg: DictConfig, hydra_cfg: DictConfig, run_dir: Path, overrides: list[str]
) -> dict:
    """One (member, inspector) job of a population (bdrun.population): the member's run, its
    weights saved in the population folder; a job that finished before is not run again."""
    from bdrun import population
    from bdrun.runner import run

    member = population.apply_member(cfg, hydra_cfg.runtime.choices, overrides)
    root = Path(hydra_cfg.sweep.dir)
    done = population.finished(run_dir, cfg, root, member)
    if done is not None:
        print(f"bdrun: {run_dir.name}: finished in an earlier run, not run again")
        return done
    return run(
        cfg,
        run_dir,
        keep_model=lambda model: population.save_member_model(model, root, member, cfg.model),
    )


def _job_failed(run_dir: Path, err: Exception) -> None:
    """A sweep job that failed: its folder keeps error.json (the summary lists it) and the
    sweep goes on; the sweep ends with an error naming every failed job (see _sweep)."""
    from bdrun.report.sweep import write_job_error

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    write_job_error(run_dir, err, overrides, hydra_cfg.job.num)
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"bdrun: job {hydra_cfg.job.num} failed: {message}", file=sys.stderr)
    return None


def _stop_sweep() -> None:
    """SIGTERM stopped a job's training: the sweep stops too, rather than starting its next job.

    In the driver (the basic launcher runs jobs in-process) the finished jobs are summarised
    first; in a worker process (joblib, Slurm) the exit fails that job and the driver reports it.
    """
    from bdrun.report import sweep

    if sweep.STATE.sweep_dir is not None and sweep.STATE.summary is None:
        sweep.finish_sweep()
    print(
        "bdrun: error: sweep stopped by SIGTERM; run the same command again: finished jobs reuse "
        "their cached models and the interrupted training resumes from its checkpoint",
        file=sys.stderr,
    )
    sys.exit(143)


def _is_multirun(args: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in args)


def _sweep() -> int:
    """Run a multirun; 0 when every job finished, else 1 after one line per failed job.

    Jobs record their own failures (error.json); what can still escape is the launcher giving
    up on a job that died without a word (a cancelled Slurm job, a killed joblib worker).
    Hydra would print that as a traceback, so it is let through (HYDRA_FULL_ERROR) and
    reported here, after the sweep's other jobs have ended and the summary is written.
    """
    from bdrun.report import sweep

    user_full_error = bool(os.environ.get("HYDRA_FULL_ERROR"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    launcher_error = None
    try:
        _task()
    except Exception as err:
        if user_full_error:
            raise
        text = str(err).strip()
        launcher_error = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
        sweep.wait_for_slurm_jobs()
        if sweep.STATE.summary is None:
            sweep.finish_sweep()
    finally:
        if not user_full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    summary = sweep.STATE.summary
    lines = sweep.failure_lines(summary, launcher_error)
    if not lines:
        return 0
    total = len(summary.records) if summary else 0
    if summary and summary.failed:
        print(f"bdrun: error: {len(summary.failed)} of {total} sweep jobs failed "
              f"(summary: {summary.root / 'summary.md'})", file=sys.stderr)  # fmt: skip
    else:
        print("bdrun: error: the sweep failed", file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)
    return 1


def main() -> None:
    """Console entry point."""
    args = sys.argv[1:]
    multirun = _is_multirun(args)
    try:
        args = rewrite_defense_stack(args)
        if not any(a in INFO_FLAGS for a in args):
            composed = check_overrides(args)
            shown = flag_value(args, "--cfg", "-c")
            if shown == "job" and not multirun and flag_value(args, "--package", "-p") is None:
                print_job_config(composed, resolve="--resolve" in args)
                return
            if shown is None:
                key = OUTPUT_DIR_KEYS[1] if multirun else OUTPUT_DIR_KEYS[0]
                check_output_dir(str(OmegaConf.select(composed, key)), key)
    except BdrunError as err:
        print(f"bdrun: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *args]
    if multirun:
        sys.exit(_sweep())
    _task()


if __name__ == "__main__":
    main()

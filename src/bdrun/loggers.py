"""Run loggers: CSV files in the run folder (default), Weights & Biases (offline unless set up
online), or none. results.json is written whatever the logger."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from bdrun.fs import atomic_file

log = logging.getLogger(__name__)


class RunLogger:
    """No-op base (logger=none): metrics still reach results.json and files still sit in the run folder."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._lightning: Any = None

    def lightning(self) -> Any:
        """The Lightning logger for training curves, or False; made at the first training in
        Lightning's loop (its loggers import Lightning, which other runs never need) and shared
        by every training of the run."""
        if self._lightning is None:
            self._lightning = self._new_lightning()
        return self._lightning

    def _new_lightning(self) -> Any:
        return False

    def log_training(self, metrics: dict[str, float], epoch: int, step: int) -> None:
        """One epoch's training figures (train/loss, train/acc) from the plain loop, in the
        form Lightning's logger gives them (epoch, and step = the epoch's last global step)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def log_image(self, name: str, path: Path) -> None:
        pass

    def log_curve(
        self,
        name: str,
        columns: list[str],
        rows: list[list[Any]],
        x: str,
        y: str | list[str],
        title: str | None = None,
    ) -> None:
        """A curve (pruning fraction vs CCA / ASR, ...): a table whose column `x` is plotted
        against the column(s) `y`; wandb shows it as a line plot, CSV keeps the table."""
        self.log_table(name, columns, rows)

    def finish(self, failed: bool = False) -> None:
        pass


class CsvRunLogger(RunLogger):
    """Training curves in train/metrics.csv (one row per epoch, columns sorted as Lightning's
    CSVLogger writes them, which takes them in Lightning's loop); tables as <name>.csv files."""

    def _new_lightning(self) -> Any:
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(self.run_dir, name="train", version="")

    def log_training(self, metrics: dict[str, float], epoch: int, step: int) -> None:
        row = {**metrics, "epoch": epoch, "step": step}
        path = self.run_dir / "train" / "metrics.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as f:  # one row per epoch, the header first
            writer = csv.DictWriter(f, fieldnames=sorted(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        path = self.run_dir / f"{name.replace('/', '_')}.csv"
        with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(rows)


class WandbRunLogger(CsvRunLogger):
    """Weights & Biases, offline unless WANDB_MODE (or `mode`) says otherwise; never waits on
    the network. Offline runs sync later with `wandb sync <run folder>/wandb/offline-run-*`."""

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        project: str = "bdrun",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
    ) -> None:
        super().__init__(run_dir)
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            name=name,
            tags=tags,
            config=config,
            dir=str(self.run_dir),
            mode=mode or os.environ.get("WANDB_MODE", "offline"),
            reinit="finish_previous",
            settings=wandb.Settings(init_timeout=30, silent=True, console="off"),
        )
        # the training curves against the global step, as Lightning's WandbLogger plots them
        self.run.define_metric("trainer/global_step")
        self.run.define_metric("train/*", step_metric="trainer/global_step", step_sync=True)

    def _new_lightning(self) -> Any:
        from pytorch_lightning.loggers import WandbLogger

        return WandbLogger(experiment=self.run)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_training(self, metrics: dict[str, float], epoch: int, step: int) -> None:
        super().log_training(metrics, epoch, step)
        self.run.log({**metrics, "epoch": epoch, "trainer/global_step": step})

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        super().log_table(name, columns, rows)
        self.run.log({name: self._wandb.Table(columns=columns, data=rows)})

    def log_image(self, name: str, path: Path) -> None:
        self.run.log({name: self._wandb.Image(str(path))})

    def log_curve(
        self,
        name: str,
        columns: list[str],
        rows: list[list[Any]],
        x: str,
        y: str | list[str],
        title: str | None = None,
    ) -> None:
        super().log_table(name, columns, rows)  # the CSV beside results.json
        ys = [y] if isinstance(y, str) else list(y)
        missing = [c for c in (x, *ys) if c not in columns]
        if missing:
            raise ValueError(f"log_curve {name!r}: no column {missing[0]!r} in {columns}")
        table = self._wandb.Table(columns=columns, data=rows)
        plot = self._wandb.plot
        if len(ys) == 1:
            chart = plot.line(table, x, ys[0], title=title or name)
        else:
            xs = [row[columns.index(x)] for row in rows]
            series = [[row[columns.index(c)] for row in rows] for c in ys]
            chart = plot.line_series(xs=xs, ys=series, keys=ys, title=title or name, xname=x)
        self.run.log({name: table, f"{name}/plot": chart})

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def sweep_group(sweep_dir: str | Path) -> str:
    """The wandb group of a sweep: its folder's last two parts (date/time by default)."""
    parts = Path(sweep_dir).parts
    return "/".join(parts[-2:]) if parts else "sweep"


def hydra_job_identity() -> tuple[str, str] | None:
    """(group, name) for a job of a Hydra multirun, or None outside one: jobs of one sweep share
    the group, and are named by job number and overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    overrides = " ".join(hydra_cfg.overrides.task) or "default"
    return sweep_group(hydra_cfg.sweep.dir), f"{hydra_cfg.job.num}: {overrides}"


def make_logger(node: Any, run_dir: Path, config: dict[str, Any]) -> RunLogger:
    """The RunLogger for the `logger` config node (kind: csv | wandb | none)."""
    from bdrun.errors import BdrunError

    settings = dict(node or {})
    kind = settings.pop("kind", "csv")
    if kind == "none":
        return RunLogger(run_dir)
    if kind == "csv":
        return CsvRunLogger(run_dir)
    if kind == "wandb":
        identity = hydra_job_identity()
        if identity is not None:
            settings["group"] = settings.get("group") or identity[0]
            settings["name"] = settings.get("name") or identity[1]
        return WandbRunLogger(run_dir, config, **settings)
    raise BdrunError(f"logger kind {kind!r} must be csv, wandb or none")

"""logger=wandb in a sweep: offline runs (nothing waits on the network), one wandb group per
sweep, jobs named by number and overrides, and a "summary" run in the same group holding the
summary table and the heatmaps as images; curves logged with RunLogger.log_curve."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from conftest import run_bdrun

BLOCK = 32768
HEADER = 7  # a .wandb file starts with ":W&B" + magic + version, then LevelDB-log records


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run file (LevelDB log format)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        left = BLOCK - offset % BLOCK
        if left < HEADER:  # block trailer padding
            offset += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        if kind == 0 and length == 0:
            break
        chunk = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def run_record(folder: Path):
    [path] = folder.glob("wandb/offline-run-*/run-*.wandb")
    [run] = [r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run"]
    return run


@pytest.mark.slow
def test_a_sweep_is_one_wandb_group_with_a_summary_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must be the default
    result = run_bdrun(
        "-m",
        "dataset=fake",
        "debug=smoke",
        "logger=wandb",
        "attack.poison_rate=0.05,0.1",
        "dataset.max_test=64,128",
        cwd=tmp_path,
        env={"WANDB_API_KEY": ""},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    [sweep] = [p.parent for p in (tmp_path / "outputs").rglob("multirun.yaml")]
    group = "/".join(sweep.parts[-2:])
    for job in range(4):
        run = run_record(sweep / str(job))
        assert run.run_group == group
        assert run.display_name.startswith(f"{job}: dataset=fake debug=smoke logger=wandb")
    summary = sweep / "wandb_summary"
    run = run_record(summary)
    assert (run.run_group, run.display_name) == (group, "summary")
    media = next(summary.glob("wandb/offline-run-*/files/media"))
    images = sorted(p.name.split("_")[1] for p in media.glob("images/sweep/*.png"))
    assert images == ["asr", "cca"]
    assert list(media.glob("table/summary_*.table.json"))


def test_log_curve_writes_the_table_and_a_line_plot(tmp_path, monkeypatch):
    import json

    from bdrun.loggers import CsvRunLogger, WandbRunLogger

    rows = [[0.0, 0.98, 1.0], [0.5, 0.97, 0.4], [0.9, 0.80, 0.05]]
    columns = ["pruned", "cca", "asr"]
    (tmp_path / "csv").mkdir()
    CsvRunLogger(tmp_path / "csv").log_curve("pruning", columns, rows, "pruned", ["cca", "asr"])
    assert (tmp_path / "csv" / "pruning.csv").read_text().splitlines()[0] == "pruned,cca,asr"

    monkeypatch.setenv("WANDB_MODE", "offline")
    folder = tmp_path / "wandb-run"
    folder.mkdir()
    logger = WandbRunLogger(folder, {"test": True})
    logger.log_curve("pruning", columns, rows, "pruned", ["cca", "asr"])
    logger.log_curve("pruning_asr", columns, rows, "pruned", "asr")
    with pytest.raises(ValueError, match="no column 'ra'"):
        logger.log_curve("bad", columns, rows, "pruned", "ra")
    logger.finish()
    tables = list(folder.glob("wandb/offline-run-*/files/media/table/pruning_*.table.json"))
    assert tables and json.loads(tables[0].read_text())["data"] == rows
    # the table itself, and each plot's data table (wandb custom charts log "<key>_table")
    expected = {"pruning/_type", "pruning/plot_table/_type", "pruning_asr/plot_table/_type"}
    deadline = time.monotonic() + 60
    while True:  # wandb's service process may still be writing the file on a loaded machine
        history = [
            r.history
            for r in wandb_records(next(folder.glob("wandb/offline-run-*/run-*.wandb")))
            if r.WhichOneof("record_type") == "history"
        ]
        keys = {"/".join(i.nested_key) or i.key for h in history for i in h.item}
        if expected <= keys or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert expected <= keys

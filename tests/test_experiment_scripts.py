"""docs/ and scripts/experiments/ stay in step with the code: every sweep an experiment script
runs composes, every script a docs page names exists, and every page a tuning file points to
exists."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

from conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts" / "experiments"
DOCS = ROOT / "docs"


def script_sweeps() -> list[tuple[str, object]]:
    """(script, Sweep) for every sweep of the scripts that declare them (SWEEPS or PAGES)."""
    sys.path.insert(0, str(SCRIPTS))
    found = []
    for path in sorted(SCRIPTS.glob("*.py")):
        text = path.read_text()
        if "SWEEPS = [" not in text and "PAGES = {" not in text:
            continue
        module = importlib.import_module(path.stem)
        sweeps = list(getattr(module, "SWEEPS", []))
        sweeps += [entry[0] for entry in getattr(module, "PAGES", {}).values()]
        found += [(path.stem, sweep) for sweep in sweeps]
    return found


def first_job(overrides: tuple[str, ...]) -> list[str]:
    """The first combination of a sweep's overrides (`a=1,2` -> `a=1`; lists kept)."""
    job = []
    for override in overrides:
        key, _, value = override.partition("=")
        job.append(override if value.startswith("[") else f"{key}={value.split(',')[0]}")
    return job


SWEEPS = script_sweeps()


def test_the_scripts_declare_sweeps():
    assert {script for script, _ in SWEEPS} >= {"sig_digits", "abl_digits", "mcr_fashion_mnist"}


@pytest.mark.parametrize(
    "sweep", [s for _, s in SWEEPS], ids=[f"{script}:{s.name}" for script, s in SWEEPS]
)
def test_every_sweep_composes(sweep):
    cfg = compose_config(*first_job(sweep.overrides), "logger=none")
    assert cfg.trainer is not None


def test_docs_pages_name_scripts_that_exist():
    pages = sorted(DOCS.rglob("*.md"))
    assert pages
    for page in pages:
        for name in re.findall(r"scripts/experiments/[\w.]+\.py", page.read_text()):
            assert (ROOT / name).is_file(), f"{page.relative_to(ROOT)} names {name}"


def test_tuning_files_point_to_pages_that_exist():
    for path in sorted((ROOT / "conf" / "tuning").rglob("*.yaml")):
        for name in re.findall(r"docs/[\w/.-]+\.md", path.read_text()):
            assert (ROOT / name).is_file(), f"{path.relative_to(ROOT)} points to {name}"


def test_the_docs_index_lists_every_page():
    index = (DOCS / "README.md").read_text()
    for page in sorted(DOCS.rglob("*.md")):
        if page.name != "README.md":
            assert str(page.relative_to(DOCS)) in index, f"docs/README.md misses {page.name}"

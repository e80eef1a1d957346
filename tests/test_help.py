"""Every job's --help works, as `python -m jobs.NAME --help` and as `gm NAME --help`, and shows the
sections of the run config that job reads and no others."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

from jobs.__main__ import JOBS
from jobs.__main__ import main as gm

RUN = {"model", "data", "optim", "train", "storage", "ray", "tracking"}
# The top-level sections of the run config each job that takes one reads.
SECTIONS = {
    "prepare-data": {"data", "storage", "ray"},
    "pretrain": RUN,
    "sft": RUN,
    "dpo": RUN | {"dpo"},
    "rl": RUN | {"rl"},
}
ALL = RUN | {"dpo", "rl"}


def help_of(job: str, capsys) -> str:
    module = importlib.import_module(JOBS[job])
    argv = sys.argv
    sys.argv = [f"gm {job}", "--help"]
    try:
        with pytest.raises(SystemExit) as exit:
            module.cli()
    finally:
        sys.argv = argv
    assert exit.value.code in (0, None), f"{job} --help exited {exit.value.code}"
    return capsys.readouterr().out


def shown_sections(text: str) -> set[str]:
    """The top-level sections a help text lists (a line `name: description` at column 0)."""
    return {m for m in re.findall(r"^([a-z_]+):", text, re.M)}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_job_has_a_help(job, capsys):
    text = help_of(job, capsys)
    assert "usage:" in text and "--print-config" in text
    doc = importlib.import_module(JOBS[job]).__doc__.strip().splitlines()[0]
    assert text.startswith(doc)
    if job in SECTIONS:
        assert shown_sections(text) & ALL == SECTIONS[job]


@pytest.mark.parametrize("job", ["sweep", "prepare-data"])
def test_gm_job_help(job, capsys):
    argv = sys.argv
    sys.argv = ["gm", job, "--help"]
    try:
        with pytest.raises(SystemExit) as exit:
            gm([job, "--help"])
    finally:
        sys.argv = argv
    assert exit.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


def test_the_command_line_entry_points_answer():
    """The real entry points in a fresh interpreter: `python -m jobs.sweep --help` used to crash
    (a section without a docstring), and `gm`'s listing names every job."""
    sweep = subprocess.run([sys.executable, "-m", "jobs.sweep", "--help"], capture_output=True, text=True, timeout=120)
    assert sweep.returncode == 0, sweep.stderr
    assert "scheduler" in sweep.stdout
    listing = subprocess.run([sys.executable, "-m", "jobs", "--help"], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and all(f"gm {name} " in listing.stdout for name in JOBS)


def test_every_job_module_is_a_gm_command():
    from pathlib import Path

    jobs = Path(__file__).resolve().parent.parent / "jobs"
    with_cli = {f"jobs.{p.stem}" for p in jobs.glob("*.py") if "\ndef cli(" in p.read_text()}
    assert with_cli == set(JOBS.values())

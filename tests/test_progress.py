"""The driver's progress display (train/progress.py) over a real Ray queue: a run that ends shows
every line its rank 0 sent; one interrupted or failed stops showing at once instead of draining a
queue its still-running workers keep filling (which held Ctrl-C up for 10 s)."""

import logging

import pytest

from generalmodel.train.progress import Progress

LINES = 200


def shown(ray_cluster, caplog, interrupted: bool) -> int:
    progress = Progress(steps=LINES, name="progress-test")
    progress.queue.put_nowait_batch([{"step": step, "loss": 1.0} for step in range(1, LINES + 1)])
    with caplog.at_level(logging.INFO, logger="generalmodel.progress"):
        if interrupted:
            with pytest.raises(KeyboardInterrupt), progress:
                raise KeyboardInterrupt
        else:
            with progress:
                pass
    return sum(record.getMessage().startswith("step ") for record in caplog.records)


def test_a_finished_run_shows_every_line(ray_cluster, caplog):
    assert shown(ray_cluster, caplog, interrupted=False) == LINES


def test_an_interrupted_run_stops_showing_at_once(ray_cluster, caplog):
    assert shown(ray_cluster, caplog, interrupted=True) < LINES // 4

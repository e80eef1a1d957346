"""What the driver's console shows of a training run: rank 0's metrics and every rank's
`generalmodel` log lines, sent through a Ray queue (`ForwardToDriver` on the workers) and shown as a
tqdm bar on a terminal or as one log line per report otherwise (`Progress`)."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)
progress_log = logging.getLogger("generalmodel.progress")


class ForwardToDriver(logging.Handler):
    """A worker's `generalmodel` log records, sent to the driver's console through the progress
    queue (the driver logs them under the worker's logger name, prefixed by the rank)."""

    def __init__(self, queue, rank: int):
        super().__init__(logging.INFO)
        self.queue, self.rank = queue, rank

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            self.queue.put_nowait({"log": record.levelno, "logger": record.name, "rank": self.rank, "msg": message})
        except Exception:  # a full or vanished queue costs a console line; the worker's log file keeps it
            pass


class Progress:
    """The driver's view of training: rank 0's metrics from a Ray queue, shown as a tqdm bar on a
    terminal (step, loss, val loss, tokens/s, MFU, ETA) or as one log line per report otherwise."""

    def __init__(self, steps: int, name: str):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: the queue must outlive the loss of a worker node, whose workers'
        # restart (and "resumed from" line) the user wants to see.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.steps, self.name = steps, name
        self._stop, self._abandon = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._show, name="training-progress", daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # A run that ended shows its last lines; one interrupted (Ctrl-C) or failed stops showing
        # at once: its workers are still training until Ray stops them, and draining a queue they
        # keep filling held Ctrl-C up for the whole 10 s join.
        if exc_type is not None:
            self._abandon.set()
        self._stop.set()
        self._thread.join(timeout=10)
        self.queue.shutdown()

    def _show(self) -> None:
        from ray.util.queue import Empty
        from tqdm import tqdm

        bar = tqdm(total=self.steps, desc=self.name, unit="step", dynamic_ncols=True) if sys.stderr.isatty() else None
        while not self._abandon.is_set():
            try:
                m = self.queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    break
                continue
            except Exception as e:  # the queue actor is gone (cluster shutting down)
                log.debug("progress display stopped: %s", e)
                break
            if "log" in m:
                if bar is not None:
                    bar.clear()
                logging.getLogger(m["logger"]).log(m["log"], "[rank %d] %s", m["rank"], m["msg"])
                if bar is not None:
                    bar.refresh()
                continue
            if bar is None:
                progress_log.info(progress_line(m, self.steps))
                continue
            bar.n = m["step"]
            bar.set_postfix_str(progress_line(m, self.steps, with_step=False), refresh=True)
        if bar is not None:
            bar.close()


def progress_line(m: dict[str, Any], steps: int, with_step: bool = True) -> str:
    parts = [f"step {m['step']:>5}/{steps}"] if with_step else []
    if "loss" in m:  # absent from RL's step-0 evaluation
        parts.append(f"loss {m['loss']:.4f}")
    if "val_loss" in m:
        parts.append(f"val {m['val_loss']:.4f}")
    if "preference_accuracy" in m:  # DPO
        parts.append(f"pref acc {m['preference_accuracy']:.0%} margin {m['reward_margin']:.3f}")
    if "val_preference_accuracy" in m:
        parts.append(f"val pref acc {m['val_preference_accuracy']:.0%}")
    if "reward_mean" in m:  # RL
        parts.append(f"reward {m['reward_mean']:.3f} (zero-var groups {m['zero_variance_groups']:.0%})")
    if "heldout_accuracy" in m:
        parts.append(f"held-out acc {m['heldout_accuracy']:.1%}")
    if "tokens_per_s" in m:
        parts += [f"{m['tokens_per_s'] / 1e3:.1f}K tok/s", f"lr {m['lr']:.2e}", f"ETA {m['eta_s'] / 60:.1f} min"]
    if "mfu" in m:
        parts.append(f"MFU {m['mfu']:.1%}")
    if "checkpoint_stall_s" in m:
        parts.append(f"ckpt stall {m['checkpoint_stall_s']:.2f}s")
    return " | ".join(parts)

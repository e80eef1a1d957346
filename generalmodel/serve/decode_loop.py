"""The decoding engine in its own thread, talking to a Serve replica's asyncio routes."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any

log = logging.getLogger(__name__)


class DecodeLoop:
    """The engine in its own thread, feeding asyncio queues. `submit` (from the event loop) queues a
    request with the asyncio.Queue its events go to; each decode step's events reach the event loop
    in one hand-over (one wake-up per step, not per token); `cancel` stops a request; `close` stops
    the thread. A request the engine refuses gets the exception in its queue; if the loop itself
    fails, every queue does."""

    def __init__(self, engine):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sinks: dict[int, asyncio.Queue] = {}
        self.stats = {"requests": 0, "cancelled": 0, "tokens": 0, "steps": 0}
        self.error: BaseException | None = None
        self.aloop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self.thread.start()

    def submit(self, request, sink: asyncio.Queue) -> None:
        self.aloop = self.aloop or asyncio.get_running_loop()
        self.inbox.put(("add", request, sink))

    def cancel(self, request) -> None:
        self.inbox.put(("cancel", request, None))

    def close(self) -> None:
        self._closing = True
        self.inbox.put(("close", None, None))
        self.thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def _hand_over(self, items: list[tuple[asyncio.Queue, Any]]) -> None:
        if items:
            self.aloop.call_soon_threadsafe(_put_all, items)

    def _run(self) -> None:
        try:
            while not self._closing:
                self._drain(block=self.engine.idle())
                if self.engine.idle():
                    continue
                events = self.engine.step()
                self.stats["steps"] += 1
                out = []
                for event in events:
                    self.stats["tokens"] += event.token is not None
                    sink = (self.sinks.pop if event.finished else self.sinks.get)(event.request.id, None)
                    if sink is not None:
                        out.append((sink, event))
                self._hand_over(out)
        except BaseException as e:  # the replica is unhealthy from now on: check_health says why
            log.exception("the decode loop failed")
            self.error = e
            self._hand_over([(sink, e) for sink in self.sinks.values()])

    def _drain(self, block: bool) -> None:
        while True:
            try:
                op, request, sink = self.inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if op == "add":
                self.stats["requests"] += 1
                try:
                    self.engine.add(request)
                except ValueError as e:
                    self._hand_over([(sink, e)])
                    continue
                self.sinks[request.id] = sink
            elif op == "cancel" and not request.done:
                self.stats["cancelled"] += 1
                self.engine.cancel(request)
                self.sinks.pop(request.id, None)


def _put_all(items) -> None:
    for sink, item in items:
        sink.put_nowait(item)

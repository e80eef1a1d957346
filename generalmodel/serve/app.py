"""An OpenAI-compatible Ray Serve application over a registered model (`jobs/serve.py`, `make serve`).

    GET  /v1/models             the model this app serves
    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream"}
    POST /v1/chat/completions   {"model", "messages": [{"role", "content"}], ...}: the chat template
                                (generalmodel.data.chat) when the model has its tokens, else a 400
    GET  /health                200 once the model is loaded and its decode loop runs
    GET  /stats                 the replica's counters: requests, cancelled, tokens, rows in use

Each replica loads the model (from the MLflow registry, `models:/NAME@ALIAS` or a version), quantizes it
if asked, and runs one `generalmodel.infer.engine.Engine` in a thread: concurrent requests share its
decode steps, joining and leaving the running batch between steps (continuous batching; `max_batch: 1`
serves one request at a time). `stream: true` answers with server-sent events ending in
`data: [DONE]`; a client that goes away cancels its request (its row is freed at the next step).
A bad field is an HTTP 400 naming it. Replicas, autoscaling and resources come from `ServeConfig`.
"""

import asyncio
import logging
import queue
import secrets
import threading
import time
from typing import Any

from pydantic import Field

from generalmodel.config import Section, StorageConfig, TrackingConfig
from generalmodel.infer.quant import Quant

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations, and the
# deployment class reaches its replicas by value (cloudpickle), without this module's namespace.
from generalmodel.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    TextStream,
    completion_body,
    error_body,
    new_id,
    sse,
    validation_message,
)
from generalmodel.tracking.registry import ModelRef

log = logging.getLogger(__name__)


class Autoscaling(Section):
    """Ray Serve's request-based autoscaling of the replicas."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(16, gt=0, description="Requests per replica Serve aims for.")


class ServeConfig(Section):
    """What to serve and how: the model, the HTTP address, batching, replicas and resources."""

    model: str = Field(..., description="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID or an export URI.")
    name: str | None = Field(None, description="The model id clients send; default: the registered name.")
    host: str = Field("127.0.0.1", description="Bind address of Serve's HTTP proxy (0.0.0.0 only when asked).")
    port: int = Field(8000, gt=0, lt=65536)
    route_prefix: str = Field("/", description="Where the app is mounted.")
    app_name: str = Field("generalmodel", description="The Serve application's name.")
    device: str = Field("cpu", description="cpu or cuda (one GPU per replica).")
    quant: Quant = Field("none", description="torchao quantization (see python -m jobs.sample --help).")
    compile: bool = Field(False, description="torch.compile the decode step while every row is busy (a card).")
    stream_interval_ms: float = Field(
        20.0,
        ge=0,
        description="A stream's chunks go out at most this often, each with the tokens decoded since the last "
        "(the first at once): fewer messages through Serve's proxy under load; 0: one chunk per token.",
    )
    max_batch: int = Field(16, gt=0, description="Sequences a replica decodes together; 1: no batching.")
    max_ongoing_requests: int = Field(64, gt=0, description="Requests a replica holds (decoding or waiting).")
    replicas: int = Field(1, gt=0, description="Replicas when autoscaling is off.")
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(1.0, gt=0, description="CPUs each replica reserves.")
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0, description="How long a stopping replica finishes requests.")
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()


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


def build_app(args: dict[str, Any]):
    """The Serve application for a `ServeConfig` (as a dict): what `serve.run` and a RayService's
    `serveConfigV2` (import_path: generalmodel.serve.app:build_app, args: {...}) deploy."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve

    cfg = ServeConfig.model_validate(args)
    api = FastAPI(title="GeneralModel", docs_url=None, redoc_url=None)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return JSONResponse(error_body(message, param), status_code=400)

    class BadRequest(Exception):
        def __init__(self, message: str, param: str | None = None):
            super().__init__(message)
            self.param = param

    @api.exception_handler(BadRequest)
    async def _bad(_request, exc: BadRequest):
        return JSONResponse(error_body(str(exc), exc.param), status_code=400)

    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": 1 if cfg.device.startswith("cuda") else 0},
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.replicas

    @serve.deployment(name="OpenAIServer", **options)
    @serve.ingress(api)
    class OpenAIServer:
        def __init__(self, cfg_dict: dict[str, Any]):
            from generalmodel.data.tokenizer import eos_id
            from generalmodel.infer.engine import Engine
            from generalmodel.infer.export import load_model
            from generalmodel.tracking import tracking_uri
            from generalmodel.tracking.registry import download_model

            self.cfg = ServeConfig.model_validate(cfg_dict)
            directory = download_model(self.cfg.model, tracking_uri(self.cfg), self.cfg.storage.resolved())
            self.model, self.tokenizer = load_model(directory, self.cfg.device, self.cfg.quant)
            self.name = self.cfg.name or served_name(self.cfg.model)
            self.eos = eos_id(self.tokenizer)
            self.chat = chat_format(self.tokenizer)
            self.context = self.model.cfg.max_seq_len
            self.created = int(time.time())
            engine = Engine(self.model, self.cfg.max_batch, compile=self.cfg.compile)
            self.loop = DecodeLoop(engine)
            log.info("serving %s as %r (max_batch %d)", self.cfg.model, self.name, self.cfg.max_batch)

        def check_health(self) -> None:  # Serve restarts a replica whose loop died
            if not self.loop.alive:
                raise RuntimeError(f"the decode loop stopped: {self.loop.error!r}")

        def __del__(self):
            loop = getattr(self, "loop", None)
            if loop is not None:
                loop.close()

        @api.get("/health")
        def health(self):
            self.check_health()
            return {"status": "ok", "model": self.name}

        @api.get("/stats")
        def stats(self):
            engine = self.loop.engine
            rows = {"active": engine.active, "waiting": len(engine.waiting), "max_batch": len(engine.rows)}
            return {**self.loop.stats, **rows}

        @api.get("/v1/models")
        def models(self):
            card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "generalmodel"}
            card["max_model_len"] = self.context
            return {"object": "list", "data": [card]}

        @api.post("/v1/completions")
        async def completions(self, body: CompletionRequest):
            if body.logprobs is not None or body.echo:
                raise BadRequest("logprobs and echo are not supported", "logprobs" if body.logprobs else "echo")
            ids = self.tokenizer.encode(body.prompt, add_special_tokens=False).ids or [self.eos]
            return await self._answer(body, ids, {self.eos}, chat=False)

        @api.post("/v1/chat/completions")
        async def chat_completions(self, body: ChatRequest):
            if self.chat is None:
                raise BadRequest(
                    f"model {self.name!r} has no chat template (its tokenizer lacks the role tokens): "
                    "use /v1/completions, or fine-tune it with jobs/sft.py",
                    "messages",
                )
            from generalmodel.data.chat import ChatFormatError

            try:
                ids = self.chat.prompt_ids([m.model_dump() for m in body.messages])
            except ChatFormatError as e:
                raise BadRequest(str(e), "messages") from None
            return await self._answer(body, ids, {self.chat.end_id, self.eos}, chat=True)

        async def _answer(self, body, ids: list[int], stop_ids: set[int], chat: bool):
            from generalmodel.infer import SamplingParams
            from generalmodel.infer.engine import Event
            from generalmodel.infer.engine import Request as Sequence

            if body.model != self.name:
                raise BadRequest(f"unknown model {body.model!r}; this server serves {self.name!r}", "model")
            try:
                self.loop.engine.check(ids)  # the engine's own rule, as a 400 before any response starts
            except ValueError as e:
                raise BadRequest(str(e), "messages" if chat else "prompt") from None
            limit = body.limit if chat else body.max_tokens
            params = SamplingParams(
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                min_p=body.min_p,
                max_new_tokens=min(limit or self.context, self.context - len(ids)),
                seed=body.seed if body.seed is not None else secrets.randbits(31),
            )
            sequence = Sequence(ids, params, frozenset(stop_ids))
            events: asyncio.Queue = asyncio.Queue()
            self.loop.submit(sequence, events)
            text = TextStream(self.tokenizer, body.stops)
            rid = new_id("chatcmpl" if chat else "cmpl")

            async def pieces():
                """(text, finish reason or None) as tokens arrive — the tokens that arrived while the
                last piece was sent go out as one piece (fewer chunks through Serve's proxy when
                the batch decodes faster than a stream is sent); cancels the sequence if abandoned."""
                interval, sent = self.cfg.stream_interval_ms / 1000, float("-inf")
                try:
                    while True:
                        batch = [await events.get()]
                        while True:  # what else arrived, or arrives before the next chunk is due
                            while not events.empty():
                                batch.append(events.get_nowait())
                            wait = sent + interval - time.monotonic()
                            if wait <= 0 or any(not isinstance(e, Event) or e.finished for e in batch):
                                break
                            try:
                                batch.append(await asyncio.wait_for(events.get(), wait))
                            except asyncio.TimeoutError:
                                break
                        sent = time.monotonic()
                        piece = ""
                        for event in batch:
                            if isinstance(event, ValueError):  # the engine refused the request
                                raise BadRequest(str(event), "messages" if chat else "prompt")
                            if isinstance(event, BaseException):
                                raise RuntimeError(f"the decode loop failed: {event!r}")
                            piece += text.add(event.token) if event.token is not None else ""
                            if text.stopped:
                                self.loop.cancel(sequence)
                                yield piece, "stop"
                                return
                            if event.finished:
                                yield piece + text.finish(), "length" if sequence.finish_reason == "length" else "stop"
                                return
                        if piece:
                            yield piece, None
                finally:
                    if not sequence.done:  # the client went away (or the task was cancelled)
                        self.loop.cancel(sequence)

            def usage() -> dict[str, int]:
                n = len(text.tokens)  # what the answer holds (the engine may be a step past a stop string)
                return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

            if not body.stream:
                out, finish = [], None
                async for piece, reason in pieces():
                    out.append(piece)
                    finish = reason
                return completion_body(rid, self.name, "".join(out), finish, usage(), chat, chunk=False)

            async def stream():
                if chat:  # OpenAI's first chunk names the role
                    first = completion_body(rid, self.name, "", None, None, chat, chunk=True)
                    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    yield sse(first)
                async for piece, finish in pieces():
                    if piece:
                        yield sse(completion_body(rid, self.name, piece, None, None, chat, chunk=True))
                    if finish:
                        yield sse(completion_body(rid, self.name, "", finish, usage(), chat, chunk=True))
                yield sse("[DONE]")

            return StreamingResponse(stream(), media_type="text/event-stream")

    return OpenAIServer.bind(cfg.model_dump(mode="json"))


def served_name(reference: str) -> str:
    """The model id of a reference: NAME of models:/NAME/N or models:/NAME@ALIAS, else the reference."""
    return ModelRef.parse(reference).display_name


def chat_format(tokenizer):
    """The model's ChatFormat, or None when its tokenizer lacks the chat tokens."""
    from generalmodel.data.chat import ChatFormat, has_chat_tokens

    return ChatFormat.from_json(tokenizer.to_str()) if has_chat_tokens(tokenizer) else None

"""An OpenAI-compatible Ray Serve application over a registered model (`jobs/serve.py`, `make serve`).

    GET  /v1/models             the model this app serves
    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
                                 "strategy": "sample" | "entropy" (entropy-aware sampling, ours)}
    POST /v1/chat/completions   {"model", "messages": [{"role", "content"}], ...}: the chat template
                                (generalmodel.data.chat) when the model has its tokens, else a 400;
                                with "tools" (and "tool_choice": "auto" | "none"), OpenAI's tool calls:
                                the answer's "tool_calls" and finish_reason "tool_calls", or, for a
                                call the model wrote wrong, its text and a "tool_call_error" naming it;
                                with "retrieval": {"k", "words"} (a server started with an index):
                                the last user message's top-k passages as a system turn before it,
                                cited in the answer's "retrieval" field (generalmodel.retrieval)
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
import secrets
import time
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field
from ray import serve

from generalmodel.config import Section, StorageConfig, TrackingConfig
from generalmodel.data.chat import ChatFormatError, Reply, messages
from generalmodel.infer import SamplingParams
from generalmodel.infer.engine import Event
from generalmodel.infer.engine import Request as Sequence
from generalmodel.infer.quant import Quant
from generalmodel.serve.decode_loop import DecodeLoop

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations.
from generalmodel.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    TextStream,
    completion_body,
    error_body,
    new_id,
    sse,
    tool_calls_body,
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
    index: str | None = Field(
        None, description="A retrieval index (python -m jobs.index): requests may ask for passages from it."
    )
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()


# The routes of every replica. Serve's deployment options (replicas, resources) are set when the
# app is built from a ServeConfig (`build_app`), so the class can live at module level.
api = FastAPI(title="GeneralModel", docs_url=None, redoc_url=None)


class BadRequest(Exception):
    """An HTTP 400 in OpenAI's error format, naming the request field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@api.exception_handler(RequestValidationError)
async def _invalid(_request, exc: RequestValidationError):
    message, param = validation_message(exc.errors())
    return JSONResponse(error_body(message, param), status_code=400)


@api.exception_handler(BadRequest)
async def _bad(_request, exc: BadRequest):
    return JSONResponse(error_body(str(exc), exc.param), status_code=400)


class Answer:
    """One request's answer as its tokens arrive from the decode loop: text pieces, then the
    whole body or the server-sent events of a stream."""

    def __init__(
        self,
        server: "OpenAIServer",
        sequence,
        events: asyncio.Queue,
        text: TextStream,
        chat: bool,
        tools: list[str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        self.server, self.sequence, self.events, self.text, self.chat = server, sequence, events, text, chat
        self.tools = tools  # the declared tools' names: the answer is parsed for calls
        self.extra = extra or {}  # fields of the body (a stream's first chunk) beyond OpenAI's: "retrieval"
        self.id = new_id("chatcmpl" if chat else "cmpl")

    async def pieces(self):
        """(text, finish reason or None) as tokens arrive — the tokens that arrived while the last
        piece was sent go out as one piece (fewer chunks through Serve's proxy when the batch
        decodes faster than a stream is sent); cancels the sequence if abandoned."""
        loop, sequence = self.server.loop, self.sequence
        interval, sent = self.server.cfg.stream_interval_ms / 1000, float("-inf")
        try:
            while True:
                batch = await self._next_events(sent + interval)
                sent = time.monotonic()
                piece = ""
                for event in batch:
                    if isinstance(event, ValueError):  # the engine refused the request
                        raise BadRequest(str(event), "messages" if self.chat else "prompt")
                    if isinstance(event, BaseException):
                        raise RuntimeError(f"the decode loop failed: {event!r}")
                    piece += self.text.add(event.token) if event.token is not None else ""
                    if self.text.stopped:
                        loop.cancel(sequence)
                        yield piece, "stop"
                        return
                    if event.finished:
                        yield piece + self.text.finish(), "length" if sequence.finish_reason == "length" else "stop"
                        return
                if piece:
                    yield piece, None
        finally:
            if not sequence.done:  # the client went away (or the task was cancelled)
                loop.cancel(sequence)

    async def _next_events(self, due: float) -> list:
        """The next event, and what else arrives before `due` (or until one ends the answer)."""
        batch = [await self.events.get()]
        while True:
            while not self.events.empty():
                batch.append(self.events.get_nowait())
            wait = due - time.monotonic()
            if wait <= 0 or any(not isinstance(e, Event) or e.finished for e in batch):
                return batch
            try:
                batch.append(await asyncio.wait_for(self.events.get(), wait))
            except asyncio.TimeoutError:
                return batch

    def usage(self) -> dict[str, int]:
        prompt = len(self.sequence.prompt_ids)
        n = len(self.text.tokens)  # what the answer holds (the engine may be a step past a stop string)
        return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}

    async def body(self) -> dict[str, Any]:
        out, finish = [], None
        async for piece, reason in self.pieces():
            out.append(piece)
            finish = reason
        if self.tools is not None:
            return {**self._with_calls(finish, chunk=False), **self.extra}
        body = completion_body(self.id, self.server.name, "".join(out), finish, self.usage(), self.chat, chunk=False)
        return {**body, **self.extra}

    def _with_calls(self, finish: str | None, chunk: bool) -> dict[str, Any]:
        """The answer parsed for tool calls (a body, or its stream's one chunk before the last)."""
        reply: Reply = self.server.chat.reply(self.text.tokens, self.tools)
        calls = tool_calls_body(reply.calls, chunk) if reply.calls else None
        finish = "tool_calls" if calls else finish
        body = completion_body(
            self.id, self.server.name, reply.content, finish, None if chunk else self.usage(), True, chunk, calls
        )
        if reply.error is not None:  # the model's call is not one: its text, and why (not a server error)
            body["choices"][0]["tool_call_error"] = {"message": reply.error, "type": "tool_call_parse_error"}
        return body

    async def stream(self):
        name, chat = self.server.name, self.chat
        if chat:  # OpenAI's first chunk names the role
            first = completion_body(self.id, name, "", None, None, chat, chunk=True)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield sse({**first, **self.extra})
        if self.tools is not None:  # calls are whole JSON: the answer goes out parsed, in one chunk
            finish = None
            async for _piece, reason in self.pieces():
                finish = reason
            body = self._with_calls(finish, chunk=True)
            finish = body["choices"][0]["finish_reason"]
            body["choices"][0]["finish_reason"] = None
            yield sse(body)
            yield sse(completion_body(self.id, name, "", finish, self.usage(), chat, chunk=True))
            yield sse("[DONE]")
            return
        async for piece, finish in self.pieces():
            if piece:
                yield sse(completion_body(self.id, name, piece, None, None, chat, chunk=True))
            if finish:
                yield sse(completion_body(self.id, name, "", finish, self.usage(), chat, chunk=True))
        yield sse("[DONE]")


def served_name(reference: str) -> str:
    """The model id of a reference: NAME of models:/NAME/N or models:/NAME@ALIAS, else the reference."""
    return ModelRef.parse(reference).display_name


def chat_format(tokenizer):
    """The model's ChatFormat, or None when its tokenizer lacks the chat tokens."""
    from generalmodel.data.chat import ChatFormat, has_chat_tokens

    return ChatFormat.from_json(tokenizer.to_str()) if has_chat_tokens(tokenizer) else None


# Defined after everything it uses: Serve serializes the class when it is decorated.
@serve.deployment(name="OpenAIServer")
@serve.ingress(api)
class OpenAIServer:
    """One replica: the model, its decode loop, the OpenAI routes."""

    def __init__(self, cfg_dict: dict[str, Any]):
        from generalmodel.data.tokenizer import eos_id
        from generalmodel.infer.engine import Engine, thoughts_of
        from generalmodel.infer.export import load_model
        from generalmodel.retrieval import open_index
        from generalmodel.tracking import tracking_uri
        from generalmodel.tracking.registry import download_model

        self.cfg = ServeConfig.model_validate(cfg_dict)
        storage = self.cfg.storage.resolved()
        directory = download_model(self.cfg.model, tracking_uri(self.cfg), storage)
        self.index = open_index(self.cfg.index, storage, tracking_uri(self.cfg)) if self.cfg.index else None
        self.model, self.tokenizer = load_model(directory, self.cfg.device, self.cfg.quant)
        self.name = self.cfg.name or served_name(self.cfg.model)
        self.eos = eos_id(self.tokenizer)
        self.chat = chat_format(self.tokenizer)
        self.context = self.model.cfg.max_seq_len
        self.created = int(time.time())
        thoughts = thoughts_of(self.model, self.tokenizer)  # a model that thinks (Coconut, Quiet-STaR)
        self.loop = DecodeLoop(Engine(self.model, self.cfg.max_batch, compile=self.cfg.compile, thoughts=thoughts))
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
        tools = body.tool_names
        if tools and body.stops:
            raise BadRequest("stop strings are not supported with tools (a call's JSON may hold them)", "stop")
        try:
            checked = messages([m.model_dump(exclude_none=True) for m in body.messages], "messages", False)
        except ChatFormatError as e:
            raise BadRequest(str(e), "messages") from None
        extra = None
        if body.retrieval is not None:
            checked, extra = await self._retrieve(checked, body.retrieval)
        try:
            ids = self.chat.prompt_ids(checked, tools=tools)
        except ChatFormatError as e:
            raise BadRequest(str(e), "tools" if tools and not self.chat.tools else "messages") from None
        return await self._answer(body, ids, {self.chat.end_id, self.eos}, chat=True, tools=tools, extra=extra)

    async def _retrieve(self, checked: list[dict], options) -> tuple[list[dict], dict[str, Any]]:
        """The conversation with the passages retrieved for its last user message as a system turn
        before that message, and the answer's "retrieval" field citing them."""
        from generalmodel.retrieval import context

        if self.index is None:
            raise BadRequest("this server has no retrieval index (start it with --index=URI)", "retrieval")
        last = max((i for i, m in enumerate(checked) if m["role"] == "user"), default=None)
        if last is None:
            raise BadRequest("retrieval searches with the last user message: the conversation has none", "retrieval")
        query = checked[last]["content"]
        hits = (await asyncio.to_thread(self.index.search, [query], options.k))[0]
        turn = {"role": "system", "content": context(hits, options.words)}
        cited = {"index": self.index.uri, "passages": [h.cited(rank) for rank, h in enumerate(hits, 1)]}
        return [*checked[:last], turn, *checked[last:]], {"retrieval": cited}

    async def _answer(
        self,
        body,
        ids: list[int],
        stop_ids: set[int],
        chat: bool,
        tools: list[str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        """The whole answer, or its stream of server-sent events (`body.stream`)."""
        sequence = Sequence(ids, self._params(body, ids, chat), frozenset(stop_ids))
        events: asyncio.Queue = asyncio.Queue()
        self.loop.submit(sequence, events)
        answer = Answer(self, sequence, events, TextStream(self.tokenizer, body.stops), chat, tools, extra)
        if not body.stream:
            return await answer.body()
        return StreamingResponse(answer.stream(), media_type="text/event-stream")

    def _params(self, body, ids: list[int], chat: bool) -> SamplingParams:
        """The request's sampling parameters; a 400 (before any response starts) for a model or a
        prompt this replica cannot answer."""
        if body.model != self.name:
            raise BadRequest(f"unknown model {body.model!r}; this server serves {self.name!r}", "model")
        try:
            self.loop.engine.check(ids)  # the engine's own rule
        except ValueError as e:
            raise BadRequest(str(e), "messages" if chat else "prompt") from None
        limit = body.limit if chat else body.max_tokens
        return SamplingParams(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            strategy=body.strategy,
            max_new_tokens=min(limit or self.context, self.context - len(ids)),
            seed=body.seed if body.seed is not None else secrets.randbits(31),
        )


def build_app(args: dict[str, Any]):
    """The Serve application for a `ServeConfig` (as a dict): what `serve.run` and a RayService's
    `serveConfigV2` (import_path: generalmodel.serve.app:build_app, args: {...}) deploy."""
    cfg = ServeConfig.model_validate(args)
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": 1 if cfg.device.startswith("cuda") else 0},
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.replicas
    return OpenAIServer.options(**options).bind(cfg.model_dump(mode="json"))

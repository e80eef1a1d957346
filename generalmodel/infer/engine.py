"""Batched decoding over a static KV cache, with continuous batching.

An `Engine` owns a `models.cache.KVCache` of `slots` rows. Requests join whenever a row is free:
their prompt is prefilled into that row (one forward each) and from then on every `step()` runs
one forward over all active rows, each at its own position, and samples one token per row with
the row's own parameters and random generator — so a request's tokens do not depend on what else
is in the batch (greedy or seeded sampling alike). A row leaves at its stop token, its token
budget, the end of the context, or when cancelled, and is reused by the next waiting request.

The context ends at the model's `max_seq_len`: a sequence (prompt + generated) never grows past it
(finish reason "length"); a prompt that leaves no room for one new token is refused with a
ValueError. `generate_batch` is the fixed-batch use of it (tests, benchmarks); `compile=True`
compiles the decode step while every row is active (static shapes; on a card, CUDA graphs too).

`strategy: entropy` (the "entropix" line of samplers) decides per row and step from the entropy H
and varentropy V (the variance of −log p) of the unfiltered next-token distribution: below
`entropy_low` the model is sure and takes the argmax; above `entropy_high` with V above
`varentropy_high` it is unsure between distinct options and samples hotter
(`explore_temperature`); otherwise it samples as `strategy: sample` does. Each decision is kept in
the request (`decisions`). Not built from that line: inserting a "think" token when H is high and V
low, and branching to pick the best continuation by a score.

A Coconut model (model.cfg.continuous_thoughts > 0, generalmodel.post.coconut) decodes with
`Thoughts`: every request's prefill is its prompt and <|start-latent|>; then that many steps each
feed the last hidden state (the final norm's output) back as the next input, on the KV cache; then
<|end-latent|>, whose logits give the first sampled token. A Quiet-STaR model
(model.cfg.quiet_star_thoughts > 0, generalmodel.post.quiet_star) decodes with `QuietThoughts`:
before every sampled token each row thinks — <|startofthought|>, that many sampled tokens,
<|endofthought|> on the KV cache — and the model's mixing head weighs the prediction after the
thought against the one without; the thought's cache entries are then rolled back. The engine
refuses either model without its thoughts (it would answer without thinking, silently otherwise).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from generalmodel.config import Section
from generalmodel.interp.analysis import entropy_stats
from generalmodel.tokens import LATENT_TOKENS, THOUGHT_TOKENS
from models.cache import new_cache


class SamplingParams(Section):
    """How to sample: temperature, then top-k / top-p / min-p filtering."""

    temperature: float = Field(0.8, ge=0, description="Softmax temperature; 0 is greedy.")
    top_k: int | None = Field(None, gt=0, description="Keep the k most likely tokens (null: all).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus: the smallest set holding this much probability.")
    min_p: float = Field(0.0, ge=0, lt=1, description="Drop tokens below min_p × the top token's probability.")
    max_new_tokens: int = Field(100, gt=0, description="Tokens to generate per prompt (at most).")
    seed: int = Field(0, description="Seeds the sampling.")
    strategy: Literal["sample", "entropy"] = Field(
        "sample", description="entropy: per step, argmax, sample or explore by the entropy and varentropy."
    )
    entropy_low: float = Field(0.3, ge=0, description="entropy: below this entropy (nats), take the argmax.")
    entropy_high: float = Field(2.5, ge=0, description="entropy: above this entropy (nats) and ...")
    varentropy_high: float = Field(2.5, ge=0, description="... above this varentropy, sample hotter.")
    explore_temperature: float = Field(1.2, gt=0, description="entropy: the hotter temperature.")


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p (nucleus) and min-p on (B, vocab) logits."""
    logits = logits / p.temperature
    if p.top_k is not None and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.min_p > 0:
        logits = logits.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    if p.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Drop a token when the tokens before it already hold top_p of the mass.
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@dataclass(frozen=True)
class Thoughts:
    """How a Coconut model decodes (module doc): `count` continuous thoughts between the ids
    `start` and `end`, each at the place of the id `thought`."""

    count: int
    start: int
    thought: int
    end: int

    @property
    def positions(self) -> int:
        """The context positions the thoughts take (with their delimiters)."""
        return self.count + 2


@dataclass(frozen=True)
class QuietThoughts:
    """How a Quiet-STaR model decodes (module doc): before every token, a thought of `count` tokens
    sampled at `temperature` between the ids `start` and `end`."""

    count: int
    start: int
    end: int
    temperature: float = 1.0

    @property
    def positions(self) -> int:
        """The context positions a thought takes while it lasts (with its delimiters)."""
        return self.count + 2


def thoughts_of(model, tokenizer) -> Thoughts | QuietThoughts | None:
    """How `model` thinks while it decodes: Coconut's continuous thoughts, Quiet-STaR's thought per
    token, or None; a ValueError when the tokenizer lacks the tokens they need."""
    for count, tokens, make in (
        (getattr(model.cfg, "continuous_thoughts", 0), LATENT_TOKENS, Thoughts),
        (getattr(model.cfg, "quiet_star_thoughts", 0), THOUGHT_TOKENS, QuietThoughts),
    ):
        if count:
            ids = {name: tokenizer.token_to_id(token) for name, token in tokens.items()}
            if None in ids.values():
                raise ValueError(f"the model thinks but the tokenizer lacks {' '.join(tokens.values())}")
            return make(count, **ids)
    return None


@dataclass(eq=False)
class Request:
    """One sequence to continue. `tokens` grows as it decodes; `finish_reason` is set when done:
    "stop" (a stop id, not in `tokens`: it is `stop_id`), "length" (max_new_tokens or the
    context), "cancelled". `logprobs` holds the log-probability of every sampled token under the
    distribution it was drawn from (after temperature and filtering; greedy: the raw softmax),
    the stop id's last: what an RL learner needs as the behaviour policy's."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_id: int | None = None
    logprobs: list[float] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)  # strategy entropy: "argmax", "sample" or "explore"
    thoughts: list[list[int]] = field(default_factory=list)  # Quiet-STaR: the thought before each token
    id: int = field(default_factory=itertools.count().__next__)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Event:
    """What one step did to a request: a new token (None when it finished without one)."""

    request: Request
    token: int | None
    finished: bool


class Engine:
    def __init__(
        self,
        model,
        slots: int,
        capacity: int | None = None,
        compile: bool = False,
        thoughts: Thoughts | QuietThoughts | None = None,
    ):
        cfg = model.cfg
        if (getattr(cfg, "continuous_thoughts", 0) or getattr(cfg, "quiet_star_thoughts", 0)) and thoughts is None:
            raise ValueError(
                "the model decodes with thoughts (Coconut's continuous thoughts or Quiet-STaR's): give the engine "
                "thoughts_of(model, tokenizer)"
            )
        if isinstance(thoughts, QuietThoughts) and compile:
            raise ValueError("compiled decoding is not built for Quiet-STaR's thought per token: compile=False")
        self.model, self.thoughts = model, thoughts
        self.reserved = thoughts.positions if thoughts is not None else 0  # per request, before its tokens
        self.cache = new_cache(model, slots, capacity)
        self.cache.trim = not compile  # compiled: every slot, static shapes
        self.capacity = self.cache.capacity
        self.device = model.embed.weight.device
        self.rows: list[Request | None] = [None] * slots
        self.waiting: deque[Request] = deque()
        self._generators: dict[int, torch.Generator] = {}
        self._last: dict[int, int] = {}  # row -> the token it feeds next
        self._decode_all = torch.compile(self._forward_all, dynamic=False) if compile else self._forward_all

    # -- requests -----------------------------------------------------------------------------

    def check(self, prompt_ids: list[int]) -> None:
        """A ValueError saying why a prompt cannot be continued (empty, or no room left)."""
        if not prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if len(prompt_ids) + self.reserved >= self.capacity:
            thinking = f" and {self.reserved} for its thoughts" if self.reserved else ""
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens{thinking}; the model's context is {self.capacity}, "
                "which leaves no room for a new token"
            )

    def add(self, request: Request) -> Request:
        """Queue a request; it joins the batch at the next step with a free row."""
        self.check(request.prompt_ids)
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request now (a client went away); its row is free for the next step."""
        if request.done:
            return
        if request in self.waiting:
            self.waiting.remove(request)
        request.finish_reason = "cancelled"
        self._release(request)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def idle(self) -> bool:
        return not self.waiting and not self.active

    # -- decoding -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Event]:
        """Admit waiting requests into free rows (prefill: their first token), then one decode
        step over the rows that were already running. Returns what happened to each request."""
        events: list[Event] = []
        running = [i for i, r in enumerate(self.rows) if r is not None]
        for row in [i for i, r in enumerate(self.rows) if r is None]:
            if not self.waiting:
                break
            events.extend(self._admit(self.waiting.popleft(), row))
        if running:
            tokens = torch.tensor([[self._last[i]] for i in running], device=self.device)
            if isinstance(self.thoughts, QuietThoughts):
                view = self.cache.view(running)
                view.reserve(1)
                logits = self._quiet(running, view, self.model(tokens, view, last_only=True, hidden=True))
            elif len(running) == len(self.rows):
                self.cache.reserve(1)
                logits = self._decode_all(tokens)
            else:
                view = self.cache.view(running)
                view.reserve(1)
                logits = self.model(tokens, view, last_only=True)
            events.extend(self._sample(running, logits[:, -1]))
        return events

    def _forward_all(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, self.cache, last_only=True)

    def _admit(self, request: Request, row: int) -> list[Event]:
        self.rows[row] = request
        self._generators[request.id] = torch.Generator(device=self.device).manual_seed(request.params.seed)
        self.cache.reset([row])
        view = self.cache.view([row])
        ids = torch.tensor([request.prompt_ids], device=self.device)
        if isinstance(self.thoughts, Thoughts):
            logits = self._think(ids, view)
        elif isinstance(self.thoughts, QuietThoughts):
            view.reserve(ids.shape[1])
            logits = self._quiet([row], view, self.model(ids, view, last_only=True, hidden=True))
        else:
            view.reserve(ids.shape[1])
            logits = self.model(ids, view, last_only=True)
        return self._sample([row], logits[:, -1])

    def _quiet(self, rows: list[int], view, base: torch.Tensor) -> torch.Tensor:
        """Quiet-STaR: each row's thought after its last token (sampled with the row's generator),
        the mixed next-token log-probabilities (n, 1, vocab), the thought's entries rolled back.
        `base`: the rows' last hidden states (n, 1, d) without the thought."""
        t, model, device = self.thoughts, self.model, self.device
        before = [self.cache.host_lengths[r] for r in rows]
        token = torch.full((len(rows), 1), t.start, device=device)
        thought = []
        for j in range(t.count + 1):  # <|startofthought|>, then the thought's tokens
            view.reserve(1)
            hidden = model(token, view, last_only=True, hidden=True)
            if j < t.count:
                probs = torch.softmax(model.logits_of(hidden[:, -1]).float() / t.temperature, -1)
                gens = [self._generators[self.rows[r].id] for r in rows]
                token = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, gens, strict=True)])
                thought.append(token)
        for r, ids in zip(rows, torch.cat(thought, 1).tolist(), strict=True):
            self.rows[r].thoughts.append(ids)
        view.reserve(1)
        end = model(torch.full((len(rows), 1), t.end, device=device), view, last_only=True, hidden=True)[:, -1]
        view.rollback(before)
        z = model.mixer(end, base[:, -1]).float()[:, None]
        after = torch.log_softmax(model.logits_of(end).float(), -1)
        without = torch.log_softmax(model.logits_of(base[:, -1]).float(), -1)
        return torch.logaddexp(F.logsigmoid(z) + after, F.logsigmoid(-z) + without)[:, None]

    def _think(self, ids: torch.Tensor, view) -> torch.Tensor:
        """Coconut: prefill the prompt and <|start-latent|>, run the thoughts, then <|end-latent|>:
        its logits (1, 1, vocab)."""
        t, device = self.thoughts, self.device
        view.reserve(ids.shape[1] + 1)
        state = self.model(torch.cat([ids, ids.new_tensor([[t.start]])], 1), view, last_only=True, hidden=True)
        marker, here = torch.tensor([[t.thought]], device=device), torch.ones(1, 1, dtype=torch.bool, device=device)
        for _ in range(t.count):
            view.reserve(1)
            state = self.model(marker, view, last_only=True, hidden=True, thoughts=(here, state[:, -1]))
        view.reserve(1)
        return self.model(torch.tensor([[t.end]], device=device), view, last_only=True)

    def _sample(self, rows: list[int], logits: torch.Tensor) -> list[Event]:
        logits = logits.float()
        picked, logprobs = [], []
        entropic = [i for i, row in enumerate(rows) if self.rows[row].params.strategy == "entropy"]
        stats = dict(zip(entropic, entropy_stats(logits[entropic]).tolist(), strict=True)) if entropic else {}
        for i, row in enumerate(rows):
            request = self.rows[row]
            p = request.params
            if i in stats:
                p = _decide(request, p, *stats[i])
            if p.temperature == 0:
                token = logits[i].argmax(-1)
                logprobs.append(logits[i].log_softmax(-1)[token])
            else:
                logp = filter_logits(logits[i : i + 1], p).log_softmax(-1)
                token = torch.multinomial(logp.exp(), 1, generator=self._generators[request.id])[0, 0]
                logprobs.append(logp[0, token])
            picked.append(token)
        events = []
        chosen = torch.stack(picked).tolist()
        for row, token, logprob in zip(rows, chosen, torch.stack(logprobs).tolist(), strict=True):
            request = self.rows[row]
            request.logprobs.append(logprob)
            if token in request.stop_ids:
                request.finish_reason, request.stop_id = "stop", token
                events.append(Event(request, None, True))
                self._release(request)
                continue
            request.tokens.append(token)
            used = len(request.prompt_ids) + self.reserved + len(request.tokens)
            if len(request.tokens) >= request.params.max_new_tokens or used >= self.capacity:
                request.finish_reason = "length"
                self._release(request)
            else:
                self._last[row] = token
            events.append(Event(request, token, request.done))
        return events

    def _release(self, request: Request) -> None:
        for row, r in enumerate(self.rows):
            if r is request:
                self.rows[row] = None
                self._last.pop(row, None)
        self._generators.pop(request.id, None)


def _decide(request: Request, p: SamplingParams, entropy: float, varentropy: float) -> SamplingParams:
    """strategy entropy: the parameters this step samples with, its decision kept in the request."""
    if entropy < p.entropy_low or p.temperature == 0:
        request.decisions.append("argmax")
        return p.model_copy(update={"temperature": 0.0})
    if entropy > p.entropy_high and varentropy > p.varentropy_high:
        request.decisions.append("explore")
        return p.model_copy(update={"temperature": p.explore_temperature})
    request.decisions.append("sample")
    return p


def generate_batch(
    model,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    stop_ids: set[int] | None = None,
    compile: bool = False,
    capacity: int | None = None,
    thoughts: Thoughts | QuietThoughts | None = None,
) -> list[Request]:
    """Continue every prompt in one batch (one row each) until all are done; the requests, in
    order, with their tokens and finish reasons."""
    per_row = params if isinstance(params, list) else [params] * len(prompts)
    engine = Engine(model, len(prompts), capacity=capacity, compile=compile, thoughts=thoughts)
    stop = frozenset(stop_ids or ())
    requests = [engine.add(Request(list(p), q, stop)) for p, q in zip(prompts, per_row, strict=True)]
    while not engine.idle():
        engine.step()
    return requests

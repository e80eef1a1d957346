"""Quiet-STaR (Zelikman et al. 2024, arXiv 2403.09629): the model learns to think a short thought
after every token, so that what it predicts next is better.

For rows of T tokens, a thought of L tokens (`quiet_star.thought_tokens`) and a look-ahead of n
tokens (`quiet_star.lookahead`), one sequence holds every position's thought at once, in blocks of
T (block b, column t):

    block 0              the row: x_t                                   position t
    block 1              <|startofthought|> after x_t                   position t + 1
    blocks 2 … L+1       the thought's tokens, sampled                  position t + b
    block L+2            <|endofthought|>: predicts x_{t+1}             position t + L + 2
    blocks L+3 … L+n+1   x_{t+1} … x_{t+n−1}, teacher-forced            position t + b

and the attention layout (`thought_layout`) lets a token of column t see the row's tokens ≤ t
and the tokens of its own column in earlier blocks — nothing of another position's thought
(tested against the plain causal forward of one position's sequence). The thoughts are sampled
block by block (L forwards without gradient, growing), then one forward with gradient gives, for
each position t and i = 1 … n, the prediction of x_{t+i} after the thought (from block L+1+i) and
without it (the row's own prediction at t+i−1), and the model's mixing head weighs them from both
hidden states: p = w·p_thought + (1 − w)·p_base. The loss is

    NLL of the mixed predictions of the supervised tokens (the assistant's: the chat loss mask)
  + quiet_star.policy_weight × REINFORCE on the thoughts' tokens, with the reward the thought's
    summed mixed log-likelihood of its n next tokens and the baseline the mean over the
    quiet_star.samples thoughts sampled at the same position (the paper's).

Statistics: `base_nll` (the same tokens without thoughts: the mixed `loss` below it means the
thoughts help) and `mix_weight` (the mean w). Decoding thinks the same way, one position at a time
(generalmodel.infer.engine, `QuietThoughts`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F

from generalmodel import UserError
from generalmodel.config import Config
from generalmodel.data.chat import ChatFormat, Rendered, messages
from generalmodel.data.tokenizer import eos_id, load_tokenizer
from generalmodel.eval.problems import seed_of
from generalmodel.post.rows import RowSet, RowsStep, read_source, train_rows
from generalmodel.storage import RunLayout
from generalmodel.tokens import THOUGHT_TOKENS
from generalmodel.train.core import Init, Report, TrainingRun
from generalmodel.train.resume import TrainingError
from models.attention import Explicit


def load_rows(cfg: Config, tokenizer_json: str) -> RowSet:
    """data.source's conversations (`messages`), rendered with their loss masks; a UserError names
    the file and line of a malformed row or of one too long for its thoughts."""
    fmt = ChatFormat.from_json(tokenizer_json)
    digest = hashlib.sha256()
    rows, qs = [], cfg.quiet_star
    limit = cfg.model.max_seq_len - qs.thought_tokens - qs.lookahead - 1  # the last thought's positions fit
    for where, row in read_source(cfg, cfg.data.source, cfg.storage.resolved(), digest):
        if "messages" not in row:
            raise UserError(f"{where}: a Quiet-STaR row needs `messages`; it has {sorted(row)}")
        rendered = fmt.render(messages(row["messages"], where))
        if len(rendered.ids) > limit:
            raise UserError(
                f"{where}: {len(rendered.ids)} tokens; with thoughts of {qs.thought_tokens} and a look-ahead of "
                f"{qs.lookahead}, model.max_seq_len={cfg.model.max_seq_len} takes rows of at most {limit}"
            )
        rows.append(rendered)
    if not rows:
        raise UserError(f"data.source {cfg.data.source!r} has no rows")
    return RowSet(cfg.data.source, rows, digest.hexdigest())


def thought_layout(T: int, thought: int, lookahead: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (S,), allowed (S, S)) of T positions' thoughts in one sequence of S = T · (L + n + 2)
    tokens, block-major (module doc): a token of column t sees the row's tokens ≤ t and its own
    column's tokens in blocks up to its own. The first k·T tokens' layout is its top-left corner."""
    blocks = thought + lookahead + 2
    block = torch.arange(blocks, device=device).repeat_interleave(T)
    column = torch.arange(T, device=device).repeat(blocks)
    qb, kb, qt, kt = block[:, None], block[None, :], column[:, None], column[None, :]
    allowed = ((kb == 0) & (kt <= qt)) | ((kb >= 1) & (kb <= qb) & (kt == qt))
    return column + block, allowed


class QuietStar:
    """The Quiet-STaR objective of one model (module doc)."""

    def __init__(self, model, cfg: Config, start: int, end: int, autocast):
        self.model, self.qs, self.start, self.end, self.autocast = model, cfg.quiet_star, start, end, autocast
        if getattr(model, "mixer", None) is None:
            raise TrainingError("Quiet-STaR needs the model's mixing head: model.quiet_star_thoughts > 0")

    def _hidden(self, ids: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, S = ids.shape
        layout = Explicit(ids, pos.expand(B, S), allowed=allowed.expand(B, S, S))
        with self.autocast:
            return self.model(ids, layout=layout, hidden=True)

    @torch.no_grad()
    def sample(self, tokens: torch.Tensor, generators: list[torch.Generator]) -> list[torch.Tensor]:
        """Every position's thought, block by block: L tensors (B, T) of token ids; row b's draws
        come from generators[b] alone."""
        B, T = tokens.shape
        L, n = self.qs.thought_tokens, self.qs.lookahead
        pos, allowed = thought_layout(T, L, n, tokens.device)
        blocks = [tokens, torch.full_like(tokens, self.start)]
        for _ in range(L):
            k = len(blocks) * T
            hidden = self._hidden(torch.cat(blocks, 1), pos[:k], allowed[:k, :k])[:, -T:]
            with self.autocast:
                probs = torch.softmax(self.model.logits_of(hidden).float() / self.qs.temperature, -1)
            rows = [torch.multinomial(probs[b], 1, generator=g).squeeze(-1) for b, g in enumerate(generators)]
            blocks.append(torch.stack(rows))
        return blocks[2:]

    def loss(self, tokens: torch.Tensor, supervised: torch.Tensor, generators: list[torch.Generator]):
        """(summed loss, summed statistics) of rows `tokens` (B, T) whose `supervised` (B, T) tokens
        are scored; every row is thought about quiet_star.samples times, sample j of row b drawn
        from generators[b · samples + j]."""
        qs = self.qs
        k, L, n = qs.samples, qs.thought_tokens, qs.lookahead
        tokens, supervised = tokens.repeat_interleave(k, 0), supervised.repeat_interleave(k, 0)
        B, T = tokens.shape
        thoughts = self.sample(tokens, generators)
        ahead = [F.pad(tokens[:, i:], (0, i), value=self.end) for i in range(1, n)]  # x_{t+i}, teacher-forced
        ids = torch.cat(
            [tokens, torch.full_like(tokens, self.start), *thoughts, torch.full_like(tokens, self.end), *ahead], 1
        )
        pos, allowed = thought_layout(T, L, n, tokens.device)
        hidden = self._hidden(ids, pos, allowed).view(B, L + n + 2, T, -1)
        with self.autocast:  # the head and the mixing head in the forward's precision
            return self._loss(tokens, supervised, thoughts, hidden)

    def _loss(self, tokens, supervised, thoughts, hidden):
        qs, model = self.qs, self.model
        k, L, n = qs.samples, qs.thought_tokens, qs.lookahead
        B, T = tokens.shape
        # the thoughts' log-probabilities under the policy that sampled them
        logp_thought = sum(
            torch.log_softmax(model.logits_of(hidden[:, j]).float() / qs.temperature, -1)
            .gather(-1, thoughts[j - 1][..., None])
            .squeeze(-1)
            for j in range(1, L + 1)
        )
        base = hidden[:, 0]
        mixed_sum = torch.zeros(B, T, device=tokens.device)
        sums = {"base_nll": torch.zeros((), device=tokens.device), "mix_weight": torch.zeros((), device=tokens.device)}
        scored = torch.zeros(B, T, dtype=torch.bool, device=tokens.device)
        for i in range(1, n + 1):
            target = F.pad(tokens[:, i:], (0, i))
            valid = F.pad(supervised[:, i:].float(), (0, i)).bool()  # x_{t+i} exists and is supervised
            with_h = hidden[:, L + 1 + i]
            base_h = F.pad(base[:, i - 1 :], (0, 0, 0, i - 1))  # the row's own prediction at t+i-1
            z = model.mixer(with_h, base_h).float()
            lw = torch.log_softmax(model.logits_of(with_h).float(), -1).gather(-1, target[..., None]).squeeze(-1)
            lb = torch.log_softmax(model.logits_of(base_h).float(), -1).gather(-1, target[..., None]).squeeze(-1)
            mixed = torch.logaddexp(F.logsigmoid(z) + lw, F.logsigmoid(-z) + lb)
            mixed_sum = mixed_sum + mixed * valid
            sums["base_nll"] = sums["base_nll"] - (lb * valid).sum().detach()
            sums["mix_weight"] = sums["mix_weight"] + (torch.sigmoid(z) * valid).sum().detach()
            scored |= valid
        reward = mixed_sum.detach()
        advantage = reward - reward.view(B // k, k, T).mean(1, keepdim=True).expand(B // k, k, T).reshape(B, T)
        policy = -(advantage * logp_thought * scored).sum()
        return -mixed_sum.sum() + qs.policy_weight * policy, sums

    @staticmethod
    def count(supervised: torch.Tensor, cfg: Config) -> float:
        """The scored (position, look-ahead) pairs of rows with this mask, all samples (the loss's units)."""
        qs = cfg.quiet_star
        return float(sum(supervised[:, i:].sum() for i in range(1, qs.lookahead + 1)) * qs.samples)


class QuietStarStep(RowsStep):
    """One optimizer step (generalmodel.post.rows): the loss is the mean over the scored pairs."""

    unit = "pairs"

    def __init__(self, run: TrainingRun, data: RowSet, tokenizer_json: str):
        super().__init__(run, data.rows)
        tokenizer = load_tokenizer(tokenizer_json, "tokenizer")
        ids = {name: tokenizer.token_to_id(token) for name, token in THOUGHT_TOKENS.items()}
        if None in ids.values():
            raise TrainingError(
                f"the tokenizer lacks {' '.join(THOUGHT_TOKENS.values())}: jobs/quiet_star.py adds them"
            )
        self.objective = QuietStar(run.model, run.cfg, ids["start"], ids["end"], run.autocast)
        self.pad = eos_id(tokenizer)  # after a row's end: never seen by its tokens, never scored

    def batch(self, rows: list[Rendered], step: int, first: int) -> dict[str, torch.Tensor]:
        width = max(len(r.ids) for r in rows)
        tokens = torch.full((len(rows), width), self.pad, dtype=torch.long)
        supervised = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r.ids)] = torch.tensor(r.ids)
            supervised[i, : len(r.mask)] = torch.tensor(r.mask, dtype=torch.bool)
        return {"tokens": tokens, "supervised": supervised, "place": torch.arange(first, first + len(rows))}

    def count(self, chunk: dict[str, torch.Tensor]) -> float:
        return QuietStar.count(chunk["supervised"], self.run.cfg)

    def loss(self, chunk: dict[str, torch.Tensor], step: int):
        """The thoughts of the row at place p of step k, sample j, come from seed (train.seed, k, p,
        j): whichever rank and micro-batch it lands in."""
        run, samples = self.run, self.run.cfg.quiet_star.samples
        generators = []
        for place in chunk["place"].tolist():
            for j in range(samples):
                g = torch.Generator(device=run.env.device)
                generators.append(g.manual_seed(seed_of(run.cfg.train.seed, step, place, j)))
        return self.objective.loss(chunk["tokens"], chunk["supervised"], generators)


def quiet_star_train(
    cfg: Config,
    report: Report | None = None,
    layout: RunLayout | None = None,
    init: Init | None = None,
    data: RowSet | None = None,
    tokenizer_json: str | None = None,
) -> dict[str, Any]:
    """The per-worker Quiet-STaR loop (generalmodel.post.rows.train_rows); returns the last metrics."""
    return train_rows(cfg, report, layout, init, data, tokenizer_json, QuietStarStep)

"""The prompts an RL run learns from and is scored on: rows of `data.source` (.jsonl/.parquet,
local, s3:// or hf:) holding a prompt (`rl.prompt_field`: a string, the user's message, or a
message list) and the fields its verifiers read (e.g. `answer`). The held-out prompts are
`rl.eval_source`, or else the val split of data.source (the SFT/DPO datasets' hash split). With
rl.tools, the prompts declare those tools (docs/tools.md).

The order is a pure function of (train.seed, step): step k takes the prompts at positions
k·P … k·P+P−1 of an endless sequence of seeded permutations (one per epoch), so a run resumed at
step k sees exactly the prompts it would have seen. With rl.skip_uniform_for = S > 0 the order is a
curriculum by pass rate (`PromptSchedule`): a prompt whose last group's rewards were all equal (all
right or all wrong: a group that gives no gradient) is passed over for the next S steps, then tried
again, so the estimate follows the policy; the schedule is part of the checkpoint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from generalmodel import UserError
from generalmodel.config import Config
from generalmodel.data.chat import ChatFormat, messages
from generalmodel.data.conversations import split_of
from generalmodel.post.rows import InMemoryData, permutation, read_source, step_items


@dataclass
class Prompt:
    where: str  # file:line, for messages about it
    messages: list[dict[str, str]]
    ids: list[int]  # the rendered conversation and `<|assistant|>`
    fields: dict[str, Any] = field(default_factory=dict)  # what the verifiers read

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class PromptSet(InMemoryData):
    """The training and held-out prompts of a run, and the digest that names them (a resumed run
    must see the same prompts)."""

    PART = "prompts"
    uri: str
    train: list[Prompt]
    heldout: list[Prompt]
    sha256: str

    def step_prompts(self, step: int, count: int, seed: int) -> list[int]:
        """Indices into `train` of step `step`'s `count` prompts."""
        return step_items(len(self.train), step, count, seed)


def load_prompts(cfg: Config, tokenizer_json: str) -> PromptSet:
    """The run's prompts, rendered with the chat format of `tokenizer_json`. A UserError names the
    file and line of a malformed row, or says which split came out empty."""
    from generalmodel.infer.tools import BUILTIN

    unknown = [t for t in cfg.rl.tools if t not in BUILTIN]
    if unknown:
        raise UserError(f"rl.tools {unknown}: the built-in tools are {', '.join(BUILTIN)}")
    fmt = ChatFormat.from_json(tokenizer_json)
    storage = cfg.storage.resolved()
    digest = hashlib.sha256()
    rows = read_source(cfg, cfg.data.source, storage, digest)
    if cfg.rl.eval_source:
        train = rows
        heldout = read_source(cfg, cfg.rl.eval_source, storage, digest)
    else:
        train, heldout = [], []
        for where, row in rows:
            (heldout if split_of(row, cfg.data, where) == "val" else train).append((where, row))
    limit = cfg.model.max_seq_len - cfg.rl.max_new_tokens
    train_prompts = [_prompt(cfg, fmt, where, row, limit) for where, row in train]
    heldout_prompts = [_prompt(cfg, fmt, where, row, limit) for where, row in heldout]
    if not train_prompts:
        raise UserError(f"data.source {cfg.data.source!r}: no training prompts (every row is in the val split?)")
    if cfg.rl.eval_prompts and not heldout_prompts:
        where = cfg.rl.eval_source or f"the val split of {cfg.data.source!r} (raise data.val_fraction)"
        raise UserError(f"no held-out prompts in {where}; or set rl.eval_prompts=0")
    return PromptSet(cfg.data.source, train_prompts, heldout_prompts, digest.hexdigest())


def _prompt(cfg: Config, fmt: ChatFormat, where: str, row: dict[str, Any], limit: int) -> Prompt:
    name = cfg.rl.prompt_field
    if name not in row:
        raise UserError(f"{where}: no field {name!r} (rl.prompt_field); the row has {sorted(row)}")
    value = row[name]
    if isinstance(value, str):
        conversation = [{"role": "user", "content": value}]
    else:
        conversation = messages(value, where, require_assistant=False)
        if conversation[-1]["role"] == "assistant":
            raise UserError(f"{where}: the prompt ends with an assistant message; the model answers after a user's")
    ids = fmt.prompt_ids(conversation, tools=list(cfg.rl.tools) or None)  # rl.tools declared to the policy
    if len(ids) > limit:
        raise UserError(
            f"{where}: the prompt has {len(ids)} tokens; model.max_seq_len {cfg.model.max_seq_len} - "
            f"rl.max_new_tokens {cfg.rl.max_new_tokens} leaves {limit}"
        )
    return Prompt(where, conversation, ids, {k: v for k, v in row.items() if k != name})


class PromptSchedule:
    """Which training prompts each step takes, and where the run is: what a checkpoint keeps.

    skip_for = 0: step k's prompts are `PromptSet.step_prompts(k)`. skip_for = S > 0: steps walk the
    same stream of seeded permutations from a cursor and pass over the prompts being skipped — a
    prompt is skipped for S steps after a group of it had equal rewards (`record`); after a whole
    epoch without enough prompts, the stream's next ones are taken whatever their state. A step's
    choice is kept until the step has trained (a request made before a checkpoint and repeated
    after the resume gets the same prompts)."""

    def __init__(self, prompts: PromptSet, per_step: int, seed: int, skip_for: int = 0):
        self.prompts, self.per_step, self.seed, self.skip_for = prompts, per_step, seed, skip_for
        self.step = 0
        self.cursor = 0
        self.skip_until: dict[int, int] = {}  # prompt -> the first step that may take it again
        self.chosen: dict[int, list[int]] = {}  # step -> its prompts, until it has trained

    def prompts_for(self, step: int) -> list[int]:
        if not self.skip_for:
            return self.prompts.step_prompts(step, self.per_step, self.seed)
        if step not in self.chosen:
            self.chosen[step] = self._next(step)
        return self.chosen[step]

    def _next(self, step: int) -> list[int]:
        n, out, scanned = len(self.prompts.train), [], 0
        while len(out) < self.per_step:
            epoch, pos = divmod(self.cursor, n)
            prompt = int(permutation(n, self.seed, epoch)[pos])
            self.cursor += 1
            scanned += 1
            if scanned > n or self.skip_until.get(prompt, 0) <= step:
                out.append(prompt)
        return out

    def record(self, step: int, groups: list[tuple[int, list[float]]]) -> None:
        """Step `step`'s groups, (prompt, its completions' rewards): equal rewards skip the prompt."""
        self.chosen.pop(step, None)
        if not self.skip_for:
            return
        for prompt, rewards in groups:
            if max(rewards) == min(rewards):
                self.skip_until[prompt] = step + 1 + self.skip_for
            else:
                self.skip_until.pop(prompt, None)

    def skipped(self, step: int) -> int:
        """Prompts that step `step` would pass over."""
        return sum(until > step for until in self.skip_until.values())

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step}
        if self.skip_for:
            state["cursor"] = self.cursor
            state["skip_until"] = {str(k): v for k, v in self.skip_until.items()}
            state["chosen"] = {str(k): v for k, v in self.chosen.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.cursor = int(state.get("cursor", 0))
        self.skip_until = {int(k): int(v) for k, v in state.get("skip_until", {}).items()}
        self.chosen = {int(k): [int(i) for i in v] for k, v in state.get("chosen", {}).items()}

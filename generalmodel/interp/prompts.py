"""The prompts of an interpretability run, from a YAML file:

    prompts:
      - name: sum-last-digit                 # names the figures; default prompt-<i>
        clean: {user: "What is 47 + 38?", assistant: "4 7 + 3 8 = 8"}
        corrupted: {user: "What is 47 + 39?", assistant: "4 7 + 3 9 = 8"}
        answer: " 5"                          # the clean prompt's next token (one token)
        wrong: " 6"                           # the corrupted prompt's
      - clean: "Fellow citizens of the"       # raw text (a pretrained model)

`clean`/`corrupted` are raw text, or a chat turn `{system?, user, assistant?}` rendered in the chat
format with the assistant's reply so far. `corrupted` (token-aligned: as many tokens as `clean`)
turns on activation patching; the metric is logit[answer] − logit[wrong] at the last position.
Without `answer` the model's own top prediction on the clean prompt is used (and the corrupted
prompt's as `wrong`, when it differs)."""

from __future__ import annotations

from dataclasses import dataclass

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from generalmodel import UserError


class ChatTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system: str | None = None
    user: str
    assistant: str = ""


class PromptSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    clean: str | ChatTurn
    corrupted: str | ChatTurn | None = None
    answer: str | None = None
    wrong: str | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.wrong is not None and self.answer is None:
            raise ValueError("`wrong` needs an `answer`")
        if self.corrupted is not None and isinstance(self.corrupted, str) != isinstance(self.clean, str):
            raise ValueError("`clean` and `corrupted` must both be text or both be chat turns")
        return self


@dataclass
class Prompt:
    name: str
    ids: list[int]
    corrupted: list[int] | None
    answer: int | None
    wrong: int | None


def read_prompts(path: str, tokenizer_json: str, max_len: int) -> list[Prompt]:
    """The prompts of `path`, tokenized for the model; a UserError naming the file and the entry
    for anything malformed, a prompt longer than `max_len`, corrupted prompts that are not
    token-aligned, or an answer that is not exactly one token."""
    from generalmodel.data.tokenizer import load_tokenizer

    try:
        with open(path) as f:
            document = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"cannot read the prompts file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    entries = document.get("prompts") if isinstance(document, dict) else document
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: expected a non-empty list `prompts:` of entries (see jobs/interp.py --help)")
    tokenizer = load_tokenizer(tokenizer_json, f"{path}: the model's tokenizer")
    prompts, names = [], set()
    for i, entry in enumerate(entries):
        where = f"{path}: prompt {i}" + (f" ({entry['name']})" if isinstance(entry, dict) and "name" in entry else "")
        try:
            spec = PromptSpec.model_validate(entry)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'entry'}: {err['msg']}" for err in e.errors())
            raise UserError(f"{where}: {problems}") from None
        prompt = _tokenize(spec, spec.name or f"prompt-{i}", tokenizer_json, tokenizer, where)
        if prompt.name in names:
            raise UserError(f"{where}: the name {prompt.name!r} is used twice (it names the figures)")
        if len(prompt.ids) > max_len:
            raise UserError(f"{where}: {len(prompt.ids)} tokens, more than the model's max_seq_len={max_len}")
        names.add(prompt.name)
        prompts.append(prompt)
    return prompts


def _tokenize(spec: PromptSpec, name: str, tokenizer_json: str, tokenizer, where: str) -> Prompt:
    if isinstance(spec.clean, ChatTurn):
        from generalmodel.data.chat import ChatFormat

        chat = ChatFormat.from_json(tokenizer_json)
        encode = chat.encode

        def ids(turn: ChatTurn) -> list[int]:
            messages = [{"role": "system", "content": turn.system}] if turn.system else []
            return chat.prompt_ids([*messages, {"role": "user", "content": turn.user}]) + encode(turn.assistant)
    else:

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False).ids

        ids = encode
    clean = ids(spec.clean)
    if not clean:
        raise UserError(f"{where}: the clean prompt is empty")
    corrupted = ids(spec.corrupted) if spec.corrupted is not None else None
    if corrupted is not None and len(corrupted) != len(clean):
        raise UserError(
            f"{where}: patching needs token-aligned prompts; clean is {len(clean)} tokens "
            f"{_show(tokenizer, clean)}, corrupted {len(corrupted)} {_show(tokenizer, corrupted)}"
        )

    def one_token(field: str, text: str | None) -> int | None:
        if text is None:
            return None
        got = encode(text)
        if len(got) != 1:
            raise UserError(
                f"{where}: {field} {text!r} is {len(got)} tokens {_show(tokenizer, got)}; it must be exactly one "
                f"(the token that follows the prompt; mind the leading space)"
            )
        return got[0]

    return Prompt(name, clean, corrupted, one_token("answer", spec.answer), one_token("wrong", spec.wrong))


def _show(tokenizer, ids: list[int]) -> str:
    return "[" + ", ".join(repr(tokenizer.decode([i], skip_special_tokens=False)) for i in ids) + "]"


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """What each token reads as, for figures and tables: the decoded text, spaces shown as ·."""
    return [tokenizer.decode([i], skip_special_tokens=False).replace(" ", "·") or f"<{i}>" for i in ids]

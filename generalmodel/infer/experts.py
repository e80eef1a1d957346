"""Transformer²'s two-pass inference (arXiv 2501.06252) over SVF expert vectors of one base model:
pass 1 looks at the prompt and decides how much of each expert to use, pass 2 answers with the
base adapted by that mix of vectors, z = Σₖ αₖ·zₖ (the paper mixes in z space, as here).

    experts = Experts(base_dir, {"qa": qa_dir, "arith": arith_dir}, mix="top1")
    model, alpha = experts.adapt(prompt_ids)        # {"qa": 0.0, "arith": 1.0}

Pass 1 here is the prompt's likelihood: the mean next-token loss of the prompt's tokens under each
expert-adapted model; `top1` takes the expert with the lowest, `softmax` weighs them by
softmax(−loss / temperature). (The paper's own dispatchers — the base asked to name the task, a
classifier expert, a few-shot search over α — need a model that can follow the question or a
labelled set per task; the likelihood needs neither.) The base's singular vectors are computed
once; each expert's model is kept built (memory: one model per expert, plus the mixed one).
"""

from __future__ import annotations

from typing import Literal

import torch

from generalmodel.data.tokenizer import tokenizer_hash
from generalmodel.errors import UserError
from generalmodel.infer.export import build_with_state, read_adapter, read_export
from models import svf

Mix = Literal["top1", "softmax"]


class Experts:
    """The base in `base_dir` (a local export) and SVF adapters of it (name -> local adapter export)."""

    def __init__(self, base_dir: str, adapters: dict[str, str], mix: Mix = "top1", temperature: float = 0.1):
        if not adapters:
            raise UserError("two-pass inference needs at least one expert adapter")
        if mix not in ("top1", "softmax"):
            raise UserError(f"experts mix {mix!r}: expected top1 or softmax")
        self.cfg, self.state, self.tokenizer_json, where = read_export(base_dir)
        self.mix, self.temperature = mix, temperature
        self.vectors: dict[str, dict[str, torch.Tensor]] = {}
        for name, directory in adapters.items():
            meta, vectors, tokenizer_json = read_adapter(directory)
            if tokenizer_hash(tokenizer_json) != tokenizer_hash(self.tokenizer_json):
                raise UserError(f"expert {name!r} ({directory}) was trained with another tokenizer than {where}")
            missing = [m for m in vectors if f"{m}.weight" not in self.state]
            if missing:
                raise UserError(f"expert {name!r} adapts {missing[:3]}, which {where} does not have")
            self.vectors[name] = vectors
        modules = sorted({m for vectors in self.vectors.values() for m in vectors})
        self.svd = {m: svf.decompose(self.state[f"{m}.weight"]) for m in modules}
        self.models = {name: self._build({name: 1.0}) for name in self.vectors}
        self.model, self.tokenizer = build_with_state(self.cfg, self.state, self.tokenizer_json, where)

    def adapted_state(self, alpha: dict[str, float]) -> dict[str, torch.Tensor]:
        """The base's state with z = Σ αₖ·zₖ in each adapted matrix (a module an expert leaves alone
        counts as its z = 1 there)."""
        state = dict(self.state)
        for module, (u, s, vh) in self.svd.items():
            z = sum(a * self.vectors[name].get(module, torch.ones_like(s)).float() for name, a in alpha.items())
            state[f"{module}.weight"] = svf.scaled(self.state[f"{module}.weight"], u, s, vh, z)
        return state

    def _build(self, alpha: dict[str, float]):
        return build_with_state(self.cfg, self.adapted_state(alpha), self.tokenizer_json, "an expert mix")[0]

    @torch.no_grad()
    def prompt_losses(self, prompt_ids: list[int]) -> dict[str, float]:
        """Pass 1: the prompt's mean next-token loss under each expert."""
        if len(prompt_ids) < 2:
            raise UserError("two-pass inference scores the prompt: it needs at least 2 tokens")
        tokens = torch.tensor([prompt_ids[-self.cfg.max_seq_len :]])
        losses = {}
        for name, model in self.models.items():
            logits = model(tokens[:, :-1]).float()
            losses[name] = torch.nn.functional.cross_entropy(logits[0], tokens[0, 1:]).item()
        return losses

    def weights(self, losses: dict[str, float]) -> dict[str, float]:
        """α from pass 1's losses: one-hot on the lowest (top1) or softmax(−loss / temperature)."""
        if self.mix == "top1":
            best = min(losses, key=losses.get)
            return {name: float(name == best) for name in losses}
        scores = torch.tensor([-losses[name] / self.temperature for name in losses])
        return dict(zip(losses, torch.softmax(scores, 0).tolist(), strict=True))

    def prompt_ids(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """A text prompt's tokens, or a conversation's in the chat format up to the assistant's turn."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt).ids
        from generalmodel.data.chat import ChatFormat

        return ChatFormat.from_json(self.tokenizer_json).prompt_ids(prompt)

    def adapt(self, prompt_ids: list[int]):
        """(the model to answer the prompt with, α): pass 1, then the base adapted by the mix."""
        alpha = self.weights(self.prompt_losses(prompt_ids))
        chosen = [name for name, a in alpha.items() if a == 1.0]
        if chosen:  # one expert: its model is built already
            return self.models[chosen[0]], alpha
        self.model.load_state_dict(self.adapted_state(alpha), strict=False)
        return self.model, alpha

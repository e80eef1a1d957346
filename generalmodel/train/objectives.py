"""What the training loop minimises, decided by the dataset's format: next-token cross-entropy for
text (pretraining) and chat (SFT: the loss mask keeps the assistant's tokens), DPO for preference
pairs. One loop (generalmodel.train.loop) runs them all. With train.token_selection < 1 the
cross-entropy keeps only that fraction of each row's supervised tokens, those whose loss
most exceeds a reference model's (Rho-1, `SelectiveLanguageModeling`).

Every objective returns *sums* over its units — supervised tokens, or pairs — and the loop divides
by the global count of units in the optimizer step (all micro-batches, all ranks). So the gradient
is the mean over every supervised token (or pair) of the step, whatever the world size and the
split into micro-batches: 2 workers × 4 rows equal 1 × 8, and masked rows weigh by their tokens,
not by their row (a per-micro-batch mean would weigh a 3-token answer like a 300-token one).

DPO (Rafailov et al. 2023), with the losses as TRL computes them: with log-ratios
ρ = log π(y|x) − log π_ref(y|x) summed over the response tokens,
    sigmoid   −log σ(β (ρ_chosen − ρ_rejected))
    ipo       (ρ_chosen/|y_chosen| − ρ_rejected/|y_rejected| − 1/(2β))²      (length-normalised)
plus `dpo.sft_weight` × the chosen response's mean token NLL (RPO). Metrics: the implicit rewards
β·ρ of chosen and rejected, their margin, preference accuracy (chosen reward > rejected), the
mean log-ratio of the responses (`logratio`, an estimate of KL(π‖π_ref) that is exact only for
responses sampled from π) and the chosen NLL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from generalmodel import UserError
from generalmodel.config import DpoConfig
from models.attention import document_ids
from models.loss import IGNORE, Selection, kept


def lm_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a text or chat batch; targets outside a chat row's mask are IGNORE."""
    tokens = batch["tokens"]
    x, y = tokens[:, :-1], tokens[:, 1:]
    if "mask" in batch:
        y = y.masked_fill(~batch["mask"][:, 1:], IGNORE)
    return x, y


def sequence_logps(model, tokens: torch.Tensor, mask: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log π over each row's supervised targets, their count) for rows of tokens with a
    loss mask (mask[:, 1:] marks the targets)."""
    with autocast:
        logits = model(tokens[:, :-1])
    targets = tokens[:, 1:]
    token_logps = -F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    keep = mask[:, 1:]
    return (token_logps * keep).sum(dim=1), keep.sum(dim=1)


class LanguageModeling:
    """Next-token cross-entropy, summed over the supervised targets: computed by the model's own
    forward (`targets=`), so a compiled model has its loss in the graph; `loss_chunk` > 0: the
    head and cross-entropy a chunk of positions at a time (models/loss.py). `separator` (the
    EOS id; train.document_mask): each document of a packed row attends only within itself —
    text rows' documents end with it; chat rows say theirs (the `docs` column)."""

    unit = "tokens"
    stats: tuple[str, ...] = ()

    def __init__(self, loss_chunk: int = 0, separator: int | None = None):
        self.loss_chunk, self.separator = loss_chunk, separator

    def documents(self, batch: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor | None:
        """The document id of each input position, or None without document masks."""
        if self.separator is None:
            return None
        if "docs" in batch:
            return batch["docs"][:, :-1]
        return document_ids(inputs, self.separator)

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        """The supervised targets of a batch, counted on the host batch (before it moves to the
        device: the training step reads nothing back from the device)."""
        if "mask" in batch:  # the supervised targets: mask[:, 1:]
            return float(batch["mask"][:, 1:].sum())
        tokens = batch["tokens"]
        return float(tokens.shape[0] * (tokens.shape[1] - 1))

    @property
    def evaluation(self) -> LanguageModeling:
        """What evaluation measures: this loss over every supervised token."""
        return self

    def loss(self, model, batch, autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = lm_targets(batch)
        docs = self.documents(batch, x)
        with autocast:
            loss = model(x, targets=y, loss_chunk=self.loss_chunk, docs=docs)
        return loss, {}


class SelectiveLanguageModeling(LanguageModeling):
    """Rho-1 (Lin et al. 2024, arXiv 2404.07965): the cross-entropy of the `fraction` of each row's
    supervised tokens whose loss under the model being trained most exceeds the reference model's
    (the batch's `ref_loss` column, computed beside the dataset by generalmodel.train.reference);
    the other tokens get no gradient. The losses that rank the tokens come from the same forward
    (models/loss.py: one head pass, or with train.loss_chunk a gradient-free chunked pass first),
    so the trunk runs once. A row keeps ⌊n·fraction⌋ of its n supervised targets (the paper ranks
    a whole batch; per row, the run is the same whatever the micro-batches and the world size),
    counted on the host; evaluation measures every token."""

    def __init__(self, fraction: float, loss_chunk: int = 0, separator: int | None = None):
        super().__init__(loss_chunk, separator)
        self.fraction = fraction

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        if "mask" in batch:
            per_row = batch["mask"][:, 1:].sum(dim=1).tolist()
        else:
            per_row = [batch["tokens"].shape[1] - 1] * batch["tokens"].shape[0]
        return float(sum(kept(n, self.fraction) for n in per_row))

    @property
    def evaluation(self) -> LanguageModeling:
        return LanguageModeling(self.loss_chunk, self.separator)

    def loss(self, model, batch, autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "ref_loss" not in batch:
            raise UserError(
                "train.token_selection: the dataset has no reference losses attached (the ref_loss column): the "
                "training job computes them from train.selection_reference before it trains"
            )
        x, y = lm_targets(batch)
        # float16 bits as int16: FSDP2 casts a forward's float inputs to bf16, which would round them
        select = Selection(batch["ref_loss"].half().view(torch.int16), self.fraction)
        with autocast:
            loss = model(x, targets=y, loss_chunk=self.loss_chunk, docs=self.documents(batch, x), select=select)
        return loss, {}


class Dpo:
    """DPO/IPO over preference pairs; the reference's log-probs come with the batch (precomputed,
    columns ref_chosen/ref_rejected) or from `reference`, a frozen model run here."""

    unit = "pairs"
    stats = ("rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy", "logratio", "nll_chosen")

    def __init__(self, cfg: DpoConfig, reference=None):
        self.cfg = cfg
        self.reference = reference

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        return float(batch["chosen"].shape[0])

    @property
    def evaluation(self) -> Dpo:
        return self

    def reference_logps(self, batch, autocast) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference is None:
            if "ref_chosen" not in batch:
                raise UserError(
                    "the preference dataset has no reference log-probs attached: jobs/dpo.py computes them "
                    "(dpo.reference=precomputed), or run the reference on the workers (dpo.reference=online)"
                )
            return batch["ref_chosen"].float(), batch["ref_rejected"].float()
        with torch.no_grad():
            both, _ = sequence_logps(self.reference, _pairs(batch, ""), _pairs(batch, "_mask"), autocast)
        return both.chunk(2)

    def loss(self, model, batch, autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, lengths = sequence_logps(model, _pairs(batch, ""), _pairs(batch, "_mask"), autocast)
        chosen, rejected = logps.chunk(2)
        len_chosen, len_rejected = lengths.float().chunk(2)
        ref_chosen, ref_rejected = self.reference_logps(batch, autocast)
        rho_chosen, rho_rejected = chosen - ref_chosen, rejected - ref_rejected
        losses = dpo_losses(
            self.cfg.loss, self.cfg.beta, rho_chosen, rho_rejected, len_chosen.clamp(min=1), len_rejected.clamp(min=1)
        )
        nll_chosen = -chosen / len_chosen.clamp(min=1)
        if self.cfg.sft_weight:
            losses = losses + self.cfg.sft_weight * nll_chosen
        beta = self.cfg.beta
        with torch.no_grad():
            stats = {
                "rewards_chosen": (beta * rho_chosen).sum(),
                "rewards_rejected": (beta * rho_rejected).sum(),
                "reward_margin": (beta * (rho_chosen - rho_rejected)).sum(),
                "preference_accuracy": (rho_chosen > rho_rejected).float().sum(),
                "logratio": ((rho_chosen + rho_rejected) / 2).sum(),
                "nll_chosen": nll_chosen.sum(),
            }
        return losses.sum(), stats


def dpo_losses(
    kind: str,
    beta: float,
    rho_chosen: torch.Tensor,
    rho_rejected: torch.Tensor,
    len_chosen: torch.Tensor,
    len_rejected: torch.Tensor,
) -> torch.Tensor:
    """Per-pair DPO losses from the summed log-ratios ρ = log π − log π_ref (see the module doc)."""
    if kind == "sigmoid":
        return -F.logsigmoid(beta * (rho_chosen - rho_rejected))
    if kind == "ipo":
        return (rho_chosen / len_chosen - rho_rejected / len_rejected - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {kind!r}")


def _pairs(batch: dict[str, torch.Tensor], suffix: str) -> torch.Tensor:
    """Chosen rows then rejected rows, in one batch (one forward for both)."""
    return torch.cat([batch["chosen" + suffix], batch["rejected" + suffix]])


def objective_for(
    fmt: str,
    dpo: DpoConfig,
    reference=None,
    loss_chunk: int = 0,
    separator: int | None = None,
    token_selection: float = 1.0,
):
    """`separator`: the EOS id with train.document_mask (text and chat), else None;
    `token_selection` < 1: Rho-1's fraction of tokens kept (text and chat)."""
    if fmt == "preference":
        return Dpo(dpo, reference)
    if token_selection < 1:
        return SelectiveLanguageModeling(token_selection, loss_chunk, separator)
    return LanguageModeling(loss_chunk, separator)

"""What the hook points are for: the logit lens, direct logit attribution and activation patching;
and the entropy and varentropy of the next-token distribution along a sequence.

All three work on any decoder of the zoo (every attention kind, MoE), on (B, T) token ids, and
leave the model as they found it. They run under `torch.no_grad()`; wrap your own call of
`run_with_hooks` for gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from generalmodel.errors import UserError
from generalmodel.interp.hooks import block_point, run_with_cache, run_with_hooks

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits (B, T, V) -> (B,)


def logit_diff(answer: int, wrong: int | None = None, position: int = -1) -> Metric:
    """logit[answer] − logit[wrong] at `position` (just logit[answer] without `wrong`), per row."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        at = logits[:, position].float()
        return at[:, answer] - (at[:, wrong] if wrong is not None else 0)

    return metric


# -- how sure the model is ------------------------------------------------------------------------


def entropy_stats(logits: torch.Tensor) -> torch.Tensor:
    """(..., vocab) logits → (..., 2): the entropy H = −Σ p log p and the varentropy Σ p (log p + H)²
    (the variance of the surprisal) of each softmax, in nats. Entropy-aware sampling
    (generalmodel.infer.engine, strategy entropy) decides by these."""
    logp = logits.float().log_softmax(-1)
    p = logp.exp()
    entropy = -(p * logp).nansum(-1)
    varentropy = (p * (logp + entropy[..., None]).square()).nansum(-1)
    return torch.stack([entropy, varentropy], dim=-1)


@torch.no_grad()
def entropy_along(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(T,) token ids → (T, 2): the entropy and varentropy of the distribution the model predicts
    the next token from, at every position (teacher-forced: what decoding the same tokens saw)."""
    return entropy_stats(model(ids[None])[0])


# -- the logit lens -------------------------------------------------------------------------------


@dataclass
class LogitLens:
    labels: list[str]  # "embed", "block 0", ..., "block L-1"
    logits: torch.Tensor  # (L + 1, B, T, V): the head read at the residual stream after each stage

    def top(self, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities and ids of the k likeliest tokens: each (L + 1, B, T, k)."""
        return self.logits.float().softmax(-1).topk(k, dim=-1)

    def prob(self, token: int) -> torch.Tensor:
        """(L + 1, B, T) probability of `token` at each stage."""
        return self.logits.float().softmax(-1)[..., token]


def one_stream(model: nn.Module, tool: str) -> None:
    """A UserError unless `model`'s blocks all read and write one residual stream (a byte model's
    blocks are a byte encoder's, a latent transformer's over patches and a byte decoder's)."""
    if not getattr(model, "one_stream", True):
        raise UserError(
            f"{tool} reads one residual stream through every block; model.name={model.cfg.name!r} has a byte "
            "stream and a patch stream (blocks.* are its encoder's, latent transformer's and decoder's): not "
            "supported (hook points, run_with_cache and activation patching are)"
        )


@torch.no_grad()
def logit_lens(model: nn.Module, ids: torch.Tensor) -> LogitLens:
    """The final norm and the head applied to the residual stream after the embedding and after
    every block: what the model would predict if it stopped there (nostalgebraist 2020). The last
    stage is the model's own logits."""
    one_stream(model, "the logit lens")
    L = model.cfg.n_layers
    _, cache = run_with_cache(model, ids, [block_point(0, "resid_pre"), "blocks.*.hook_resid_post"])
    stream = [cache[block_point(0, "resid_pre")]] + [cache[block_point(i, "resid_post")] for i in range(L)]
    return LogitLens(["embed"] + [f"block {i}" for i in range(L)], torch.stack([unembed(model, x) for x in stream]))


def unembed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.unembed(x)


# -- direct logit attribution ----------------------------------------------------------------------


@dataclass
class Attribution:
    """Each component's direct effect on a logit (difference) at one position: the embedding,
    every attention head of every layer, the attention output bias, every MLP/MoE; `constant` is
    the final norm's bias term. `names[i]` ↔ `values[i]` (B,); they sum, with `constant`, to `logit`
    (with `logit_softcap`, the logit difference before the cap, which is not additive)."""

    names: list[str]
    values: torch.Tensor  # (components, B)
    constant: torch.Tensor  # (B,)
    logit: torch.Tensor  # (B,): the model's own value of the direction

    def heads(self) -> torch.Tensor:
        """(L, H, B): the per-head values as a layer × head grid."""
        rows = [(int(n.split(".")[0][1:]), int(n.split("H")[1])) for n in self.names if ".H" in n]
        L, H = max(r for r, _ in rows) + 1, max(h for _, h in rows) + 1
        return self.values[[i for i, n in enumerate(self.names) if ".H" in n]].view(L, H, -1)


@torch.no_grad()
def direct_logit_attribution(
    model: nn.Module, ids: torch.Tensor, answer: int, wrong: int | None = None, position: int = -1
) -> Attribution:
    """Split logit[answer] (− logit[wrong]) at `position` into what each component wrote into the
    residual stream, read through the head with the final norm's scale frozen at its value on
    the actual stream (the norm is linear once its scale is fixed; LayerNorm's centring is).
    Models whose blocks rescale or re-add the stream (model.embed_skip, model.unet_skips) are
    refused: their stream is not the plain sum of the components."""
    one_stream(model, "direct logit attribution")
    skips = [name for name in ("embed_skip", "unet_skips") if getattr(model.cfg, name, False)]
    if skips:
        raise UserError(
            f"direct logit attribution reads the residual stream as the sum of what each component wrote; "
            f"model.{'/'.join(skips)} rescale and re-add it between blocks: not supported (the logit lens is)"
        )
    L = model.cfg.n_layers
    # A head's part of the output: its z through its columns of out_proj; an attention whose heads
    # have output projections of their own (MoEUT's SwitchHead) hands each head's output out.
    per_head = all(hasattr(model.blocks[layer].attn, "hook_head_out") for layer in range(L))
    heads = "blocks.*.attn.hook_head_out" if per_head else "blocks.*.attn.hook_z"
    points = [block_point(0, "resid_pre"), heads, "blocks.*.hook_mlp_out"]
    logits, cache = run_with_cache(model, ids, points)
    head = model.head.weight
    direction = head[answer] - (head[wrong] if wrong is not None else 0)  # (d,)
    names, parts = ["embed"], [cache[block_point(0, "resid_pre")][:, position]]
    for layer in range(L):
        if per_head:
            outputs = cache[block_point(layer, "attn.hook_head_out")][:, position]  # (B, H, d)
            names += [f"L{layer}.H{h}" for h in range(outputs.shape[1])]
            parts += list(outputs.transpose(0, 1))
            names.append(f"L{layer}.mlp")
            parts.append(cache[block_point(layer, "mlp_out")][:, position])
            continue
        out_proj = model.blocks[layer].attn.out_proj
        z = cache[block_point(layer, "attn.hook_z")][:, position]  # (B, H, dh)
        H, dh = z.shape[1:]
        names += [f"L{layer}.H{h}" for h in range(H)]
        parts += list(torch.einsum("bhd,ehd->hbe", z, out_proj.weight.view(-1, H, dh)))  # H × (B, d)
        if out_proj.bias is not None:
            names.append(f"L{layer}.attn_bias")
            parts.append(out_proj.bias.expand_as(parts[0]))
        names.append(f"L{layer}.mlp")
        parts.append(cache[block_point(layer, "mlp_out")][:, position])
    stack = torch.stack(parts)  # (C, B, d); sums to the stream the final norm reads
    norm = model.final_norm
    scale, centre = _frozen_norm(norm, stack.sum(0))
    if centre:
        stack = stack - stack.mean(-1, keepdim=True)
    values = (stack * scale * norm.weight) @ direction
    bias = getattr(norm, "bias", None)
    constant = (bias @ direction if bias is not None else direction.new_zeros(())).expand(ids.shape[0])
    cap = getattr(model.cfg, "logit_softcap", None)
    if cap is not None:  # the components add up before the (monotone) soft-cap: compare with the raw logits
        logits = (cap * torch.atanh((logits.double() / cap).clamp(-1 + 1e-12, 1 - 1e-12))).to(logits.dtype)
    return Attribution(names, values, constant, logit_diff(answer, wrong, position)(logits))


def _frozen_norm(norm: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(1 / the norm's denominator on x (B, 1), whether it centres): RMSNorm or LayerNorm."""
    if isinstance(norm, nn.LayerNorm):
        return (x.var(-1, keepdim=True, unbiased=False) + norm.eps).rsqrt(), True
    return (x.pow(2).mean(-1, keepdim=True) + norm.eps).rsqrt(), False


# -- activation patching ----------------------------------------------------------------------------


@dataclass
class Patching:
    """metric of the corrupted run with one activation taken from the clean run: `results[point]`
    is a layer × position grid for a per-position point, a layer × head grid for `HEADS`;
    `normalized` maps corrupted → 0 and clean → 1."""

    clean: float
    corrupted: float
    results: dict[str, torch.Tensor]

    def normalized(self, point: str) -> torch.Tensor:
        gap = self.clean - self.corrupted
        return (self.results[point] - self.corrupted) / (gap if gap else float("nan"))


HEADS = "heads"  # per-head patching: each head's output (attn.hook_z) at every position


@torch.no_grad()
def patch(
    model: nn.Module,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    metric: Metric,
    points: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
    heads: bool = False,
    batch_size: int = 64,
) -> Patching:
    """Activation patching (Meng et al. 2022; Heimersheim & Nanda 2024): run the corrupted prompt
    with a single activation — one per-block hook point at one layer and one position — replaced
    by its value on the clean prompt, for every layer × position, and record `metric`; with
    `heads`, also each attention head's output (all positions) for every layer × head. The
    patches of a layer run as rows of one batch. `clean`, `corrupted`: (T,) or (1, T), of the same
    length (token-aligned prompts)."""
    clean, corrupted = clean.view(1, -1), corrupted.view(1, -1)
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"patching needs token-aligned prompts: the clean one has {clean.shape[1]} tokens, the corrupted "
            f"one {corrupted.shape[1]}"
        )
    L, T = model.cfg.n_layers, clean.shape[1]
    names = [block_point(layer, p) for p in (*points, *(["attn.hook_z"] if heads else [])) for layer in range(L)]
    clean_logits, cache = run_with_cache(model, clean, names)
    results = {}
    for point in points:
        grid = torch.empty(L, T)
        for layer in range(L):
            name = block_point(layer, point)
            for start in range(0, T, batch_size):
                positions = torch.arange(start, min(T, start + batch_size))

                def write(x, positions=positions, value=cache[name]):
                    x[torch.arange(len(positions)), positions] = value[0, positions].to(x.dtype)

                grid[layer, positions] = _patched(model, corrupted, name, len(positions), write, metric)
        results[point] = grid
    if heads:
        H = cache[block_point(0, "attn.hook_z")].shape[2]
        grid = torch.empty(L, H)
        for layer in range(L):
            name = block_point(layer, "attn.hook_z")

            def write(x, value=cache[name]):  # (B, T, H, dh): row h gets head h's clean output
                for h in range(H):
                    x[h, :, h] = value[0, :, h].to(x.dtype)

            grid[layer] = _patched(model, corrupted, name, H, write, metric)
        results[HEADS] = grid
    return Patching(float(metric(clean_logits)[0]), float(metric(model(corrupted))[0]), results)


def _patched(model, corrupted, name: str, rows: int, write, metric) -> torch.Tensor:
    """`metric` of `rows` copies of the corrupted prompt, `write` changing the activation `name`."""

    def replace(x: torch.Tensor, _name: str) -> torch.Tensor:
        x = x.clone()
        write(x)
        return x

    return metric(run_with_hooks(model, corrupted.expand(rows, -1), [(name, replace)])).float().cpu()

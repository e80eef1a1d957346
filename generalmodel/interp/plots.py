"""Figures of the interpretability tools (matplotlib, Agg): attention patterns, the patching
heatmap, the logit lens, direct logit attribution, MoE routing, entropy and varentropy along a
sequence. Each returns a Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from generalmodel.interp.analysis import HEADS, Attribution, LogitLens, Patching  # noqa: E402

LABELLED = 48  # at most this many tokens get their text on an axis


def _token_axis(ax, labels: list[str], axis: str) -> None:
    if len(labels) > LABELLED:
        return
    ticks = range(len(labels))
    if axis == "x":
        ax.set_xticks(ticks, labels, rotation=90, fontsize=6)
    else:
        ax.set_yticks(ticks, labels, fontsize=6)


def attention_figure(patterns: torch.Tensor, labels: list[str], title: str, max_heads: int = 8):
    """patterns (L, H, T, T) of one prompt: a layer × head grid (the first `max_heads` heads)."""
    L, H = patterns.shape[:2]
    H = min(H, max_heads)
    size = 2.2 if len(labels) <= 24 else 3.0
    fig, axes = plt.subplots(L, H, figsize=(size * H, size * L), squeeze=False)
    for layer in range(L):
        for head in range(H):
            ax = axes[layer, head]
            ax.imshow(patterns[layer, head].float().numpy(), cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if layer == L - 1:
                _token_axis(ax, labels, "x")
            if head == 0:
                _token_axis(ax, labels, "y")
                ax.set_ylabel(f"layer {layer}", fontsize=8)
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
    fig.suptitle(f"{title}: attention (row: query, column: key)")
    fig.tight_layout()
    return fig


def patching_figure(result: Patching, labels: list[str], title: str):
    """One heatmap per patched point, normalised (0 = corrupted, 1 = clean): layer × position, or
    layer × head for the per-head patching."""
    points = list(result.results)
    widths = [result.results[p].shape[1] for p in points]
    fig, axes = plt.subplots(
        1, len(points), figsize=(0.28 * sum(widths) + 3, 3.6), squeeze=False, width_ratios=[max(w, 4) for w in widths]
    )
    for ax, point in zip(axes[0], points, strict=True):
        grid = result.normalized(point).numpy()
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set(title=point, ylabel="layer")
        ax.set_yticks(range(grid.shape[0]))
        if point == HEADS:
            ax.set_xticks(range(grid.shape[1]))
            ax.set_xlabel("head")
        else:
            _token_axis(ax, labels, "x")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="recovered (0 corrupted, 1 clean)")
    fig.suptitle(f"{title}: activation patching (clean {result.clean:.2f}, corrupted {result.corrupted:.2f})", y=1.03)
    return fig


def logit_lens_figure(lens: LogitLens, labels: list[str], decode, title: str, last: int = 16):
    """The top token and its probability at each stage (row) and position (column) of row 0, for
    the last `last` positions."""
    probs, top = lens.top(1)
    probs, top = probs[:, 0, -last:, 0], top[:, 0, -last:, 0]
    labels = labels[-last:]
    fig, ax = plt.subplots(figsize=(0.9 * len(labels) + 2, 0.5 * len(lens.labels) + 1.5))
    ax.imshow(probs.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for stage in range(probs.shape[0]):
        for position in range(probs.shape[1]):
            colour = "black" if probs[stage, position] > 0.6 else "white"
            text = decode(int(top[stage, position]))
            ax.text(position, stage, text, ha="center", va="center", fontsize=6, color=colour)
    ax.set_yticks(range(len(lens.labels)), lens.labels, fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set(title=f"{title}: logit lens (top token; colour: its probability)", xlabel="input token at position")
    fig.tight_layout()
    return fig


def attribution_figure(attribution: Attribution, title: str, what: str):
    """Row 0's direct logit attribution: a layer × head heatmap and the embedding / MLP bars."""
    heads = attribution.heads()[..., 0].cpu().numpy()
    others = [(n, float(v[0])) for n, v in zip(attribution.names, attribution.values, strict=True) if ".H" not in n]
    fig, (ax_heads, ax_rest) = plt.subplots(1, 2, figsize=(11, 0.45 * heads.shape[0] + 2.5))
    bound = max(abs(heads).max(), 1e-6)
    image = ax_heads.imshow(heads, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax_heads.set(xlabel="head", ylabel="layer", title="attention heads")
    ax_heads.set_yticks(range(heads.shape[0]))
    ax_heads.set_xticks(range(heads.shape[1]))
    fig.colorbar(image, ax=ax_heads)
    ax_rest.barh([n for n, _ in others], [v for _, v in others], color=["C3" if v > 0 else "C0" for _, v in others])
    ax_rest.invert_yaxis()
    ax_rest.set(title="embedding, MLP / MoE, biases", xlabel="direct effect")
    fig.suptitle(f"{title}: direct logit attribution of {what} (total {float(attribution.logit[0]):.2f})")
    fig.tight_layout()
    return fig


def routing_figure(choices: dict[int, torch.Tensor], n_experts: int, title: str):
    """Tokens sent to each expert, one panel per MoE layer (`choices`: layer → expert ids)."""
    fig, axes = plt.subplots(1, len(choices), figsize=(3.2 * len(choices), 3), squeeze=False, sharey=True)
    for ax, (layer, ids) in zip(axes[0], choices.items(), strict=True):
        counts = torch.bincount(ids.flatten(), minlength=n_experts)
        ax.bar(range(n_experts), counts.numpy())
        ax.set(title=f"layer {layer}", xlabel="expert")
    axes[0, 0].set_ylabel("token choices")
    fig.suptitle(f"{title}: MoE routing")
    fig.tight_layout()
    return fig


DECISION_COLOURS = {"argmax": "tab:green", "sample": "tab:blue", "explore": "tab:red"}


def entropy_figure(stats: torch.Tensor, labels: list[str], title: str, decisions: list[str] | None = None):
    """stats (T, 2): the entropy and varentropy of the next-token distribution at each position,
    labelled by the token predicted there; `decisions` (one per position): entropy-aware
    sampling's choice at each step, marked on the entropy curve."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(labels)), 3.2))
    steps = range(len(labels))
    ax.plot(steps, stats[:, 0].tolist(), label="entropy (nats)", color="black")
    ax.plot(steps, stats[:, 1].tolist(), label="varentropy", color="tab:orange", linestyle="--")
    for kind, colour in DECISION_COLOURS.items():
        at = [i for i, d in enumerate(decisions or []) if d == kind]
        if at:
            ax.scatter(at, stats[at, 0].tolist(), color=colour, s=14, zorder=3, label=kind)
    _token_axis(ax, labels, "x")
    ax.set_ylabel("nats")
    ax.legend(fontsize=7)
    ax.set_title(f"{title}: entropy and varentropy of each next token")
    fig.tight_layout()
    return fig

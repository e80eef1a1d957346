"""DeepSeekMoE-style feed-forward: fine-grained routed experts plus always-on shared experts.

Routing: scores = softmax or sigmoid(router(x)); each token takes the top-k experts by
score + bias, where the per-expert bias only affects the selection and is nudged toward balance
after each optimizer step from the tokens-per-expert counts (auxiliary-loss-free balancing,
DeepSeek-V3); the gates are the chosen scores, normalized to sum to 1. An optional small
sequence-wise auxiliary loss is kept in `aux_loss` for the training loop to add.

Experts are SwiGLU MLPs stored as stacked weights, so that the routed tokens, sorted by expert,
go through one grouped matmul in bf16 (`torch._grouped_mm`, offsets on the device: no host sync,
static shapes, one compiled graph); `forward_reference` is the plain per-expert loop in token
order, the definition the grouped path is tested against. The layer is dropless (no capacity):
a token's output depends on its own routing only, never on other tokens of the batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.hooks import HookPoint


class MoE(nn.Module):
    def __init__(
        self,
        d_model: int,
        hidden: int,
        n_experts: int,
        top_k: int,
        n_shared: int,
        score: str = "sigmoid",
        bias_update_rate: float = 1e-3,
        aux_loss_weight: float = 0.0,
        experts: nn.Module | None = None,
    ):
        """`experts`: stacks `w_up`, `w_down` run on rows grouped by expert (default: SwiGLU's,
        `GroupedExperts`; MoEUT's σ-MoE passes ReLU experts)."""
        super().__init__()
        _outside_compiled_graphs()
        self.n_experts, self.top_k, self.hidden = n_experts, top_k, hidden
        self.score, self.bias_update_rate, self.aux_loss_weight = score, bias_update_rate, aux_loss_weight
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = experts if experts is not None else GroupedExperts(n_experts, d_model, hidden)
        self.shared = SharedExperts(d_model, hidden * n_shared) if n_shared else None
        self.register_buffer("expert_bias", torch.zeros(n_experts), persistent=True)
        self.register_buffer("tokens_per_expert", torch.zeros(n_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        # Set by generalmodel.train.expert_parallel: the experts live on several ranks.
        self.expert_parallel = None
        self._register_load_state_dict_pre_hook(_experts_renamed)
        self.hook_router_logits = HookPoint()  # (B, T, E), fp32
        self.hook_expert_ids = HookPoint()  # (B, T, top_k): the experts each token goes to
        # Usable on its own (like nn.Linear); a Decoder re-initializes it with its residual scale.
        self.init_weights(0.02, 0.02)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Router and expert input weights N(0, std); expert (and shared expert) output weights,
        which write into the residual stream, N(0, residual_std); routing biases zero."""
        nn.init.normal_(self.router.weight, mean=0.0, std=std)
        nn.init.normal_(self.experts.w_up, mean=0.0, std=std)
        nn.init.normal_(self.experts.w_down, mean=0.0, std=residual_std)
        if self.shared is not None:
            self.shared.init_weights(std, residual_std)
        self.expert_bias.zero_()

    def inactive_params(self) -> int:
        """Routed-expert parameters a token does not use (all but its top-k experts)."""
        return (self.n_experts - self.top_k) * (self.experts.w_up[0].numel() + self.experts.w_down[0].numel())

    # -- routing ---------------------------------------------------------------------------------

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (..., d) → expert ids (..., k), gates (..., k), scores (..., E); counts tokens per expert."""
        logits = self.hook_router_logits(self.router(x).float())
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        # The bias takes part in the selection only.
        idx = self.hook_expert_ids(torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices)
        gates = scores.gather(-1, idx)
        gates = gates / gates.sum(-1, keepdim=True)
        if self.training:  # the balancing statistics count training tokens only
            with torch.no_grad():
                self.tokens_per_expert += expert_counts(idx.flatten(), self.n_experts).float()
        return idx, gates.type_as(x), scores

    def _aux(self, scores: torch.Tensor, idx: torch.Tensor, B: int, T: int) -> torch.Tensor | None:
        """Sequence-wise balance loss: E · Σ_i f_i · P_i per sequence, averaged (DeepSeek-V3)."""
        if not (self.training and self.aux_loss_weight > 0):
            return None
        probs = (scores / scores.sum(-1, keepdim=True)).view(B, T, -1).mean(1)  # (B, E)
        chosen = F.one_hot(idx, self.n_experts).sum(1).float().view(B, T, -1)
        load = chosen.mean(1) * self.n_experts / self.top_k  # (B, E)
        return self.aux_loss_weight * (load * probs).sum(-1).mean()

    # -- experts ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        idx, gates, scores = self.route(x)
        idx, gates, scores = idx.reshape(B * T, -1), gates.reshape(B * T, -1), scores.reshape(B * T, -1)
        self.aux_loss = self._aux(scores, idx, B, T)
        routed = self._grouped(flat, idx, gates).view(B, T, d)
        return routed if self.shared is None else routed + self.shared(x)

    def _grouped(self, x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Sort the (token, expert) pairs by expert, run every expert's contiguous slice (here, or
        on the ranks that hold them: `expert_parallel`), weight by the gates, scatter back."""
        N, k = idx.shape
        experts = idx.flatten()
        order = experts.argsort(stable=True)
        token_of = order // k  # which token each sorted row came from
        rows = x[token_of]  # (N·k, d), grouped by expert
        if self.expert_parallel is not None:
            y = self.expert_parallel(self, rows, experts[order])
        else:
            y = self.run_experts(rows, expert_counts(experts, self.n_experts))
        y = y.type_as(x) * gates.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token_of, y)

    def run_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The SwiGLU experts this module holds on rows grouped by expert (counts[e] rows each)."""
        return self.experts(rows, counts)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The definition: for every token, Σ over its chosen experts of gate · expert(token)."""
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        idx, gates, _ = self.route(flat)
        out = torch.zeros_like(flat)
        for e in range(self.n_experts):
            token, slot = (idx == e).nonzero(as_tuple=True)
            if len(token):
                gate, value = (flat[token] @ self.experts.w_up[e]).chunk(2, dim=-1)
                out.index_add_(0, token, (F.silu(gate) * value) @ self.experts.w_down[e] * gates[token, slot, None])
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(B, T, d)

    # -- balancing -------------------------------------------------------------------------------

    @torch.no_grad()
    def update_bias(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """After an optimizer step: move each expert's bias toward balance by a fixed step
        (sign of mean load − load), using the counts of every rank; reset the counts. `keep`: a
        0-d 0/1 tensor, 0 when the step was skipped (the bias stays). All on the device, no host
        read; returns the max-over-mean load (0 when no token was routed) for the metrics."""
        counts = self.tokens_per_expert.clone()
        if dist.is_initialized():
            dist.all_reduce(counts)
        mean = counts.mean()
        routed = (mean > 0).to(counts.dtype)
        move = self.bias_update_rate * torch.sign(mean - counts) * routed
        self.expert_bias += move if keep is None else move * keep
        self.tokens_per_expert.zero_()
        return counts.max() / mean.clamp(min=1e-9) * routed


class GroupedExperts(nn.Module):
    """The routed experts' SwiGLU weights as stacks — w_up (E, d, 2h: gate|value), w_down (E, h, d)
    — run on rows grouped by expert. A module of their own, so that expert parallelism can shard
    them apart from the router and the shared experts (generalmodel/train/expert_parallel.py);
    there they are DTensors over the expert ranks (`sharded`), and each rank runs its own shard."""

    sharded = False  # set by expert parallelism: the weights are DTensors, this rank runs its own shard

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, d_model))

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows (M, d) grouped by expert, counts[e] rows for expert e of those held here."""
        w_up, w_down = (w.to_local() if self.sharded else w for w in (self.w_up, self.w_down))
        gate, value = _grouped_matmul(rows, w_up, counts).chunk(2, dim=-1)
        return _grouped_matmul(F.silu(gate) * value, w_down, counts)


class SharedExperts(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.up.weight, mean=0.0, std=std)
        nn.init.normal_(self.down.weight, mean=0.0, std=residual_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * value)


def _experts_renamed(state_dict, prefix, *args) -> None:
    """Weights saved before the experts had their module (`mlp.w_up`) load as `mlp.experts.w_up`."""
    for name in ("w_up", "w_down"):
        if prefix + name in state_dict:
            state_dict[f"{prefix}experts.{name}"] = state_dict.pop(prefix + name)


def expert_counts(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens per expert, (n_experts,) int64. A scatter-add, not `bincount`: its shape does not
    depend on the data, so torch.compile keeps it in the graph and the host never waits for it."""
    return torch.zeros(n_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def _grouped_matmul(rows: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """rows (M, K) grouped by expert (counts[e] rows each) @ weights[e] (K, N) → (M, N).

    In bf16 (autocast or not; CUDA, or CPU) one `torch._grouped_mm` with the group offsets on the
    device: static shapes, no host sync, one graph under torch.compile (routing, sorting and
    scatter included). Otherwise (fp32) a loop over the groups, kept out of compiled graphs (it
    reads the counts)."""
    device = rows.device.type
    if torch.is_autocast_enabled(device):
        rows = rows.to(torch.get_autocast_dtype(device))
    # _grouped_mm wants 16-byte aligned rows: K and N multiples of 8 in bf16.
    aligned = rows.shape[1] % 8 == 0 and weights.shape[-1] % 8 == 0
    if rows.dtype == torch.bfloat16 and aligned and hasattr(torch, "_grouped_mm"):
        offsets = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(rows, weights.to(rows.dtype), offs=offsets)
    return _grouped_loop(rows, weights, counts)


def _grouped_loop_eager(rows: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    # Empty groups too: every weight and the rows stay in the autograd graph (a zero gradient for
    # an expert without rows), so that every expert-parallel rank runs the same collectives in
    # backward even when no row reached its experts.
    parts, start = [], 0
    for e, n in enumerate(counts.tolist()):
        parts.append(rows[start : start + n] @ weights[e].to(rows.dtype))
        start += n
    return torch.cat(parts)


# The loop, kept out of compiled graphs by `torch.compiler.disable` once the first MoE layer is
# built (`_outside_compiled_graphs`), before anything can compile it: the decorator imports
# torch._dynamo (~1 s per process), which a process without experts never needs.
_grouped_loop = _grouped_loop_eager


def _outside_compiled_graphs() -> None:
    global _grouped_loop
    if _grouped_loop is _grouped_loop_eager:
        _grouped_loop = torch.compiler.disable(_grouped_loop_eager)

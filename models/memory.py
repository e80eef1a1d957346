"""Memory layers: a sparse, very wide feed-forward in place of a block's MLP.

`ProductKeyMemory` (Lample et al. 2019, arXiv 1907.05242; the memory layers at scale of Berges
et al. 2024): each of `heads` queries (a projection of the token, RMS-normalised per half) is
split in two halves scored against two sets of `n_keys` sub-keys; the top-k of each half combine
into k² candidates of the Cartesian product, whose top-k are exactly the top-k over all
N = n_keys² full keys (a full key is a pair of sub-keys, its score the sum of the halves' — so
N keys cost 2·√N scores). The k retrieved slots of every head are mixed by the softmax of their
scores:

- `kind="pkm"`: each slot holds a value vector (d_model); the output is the weighted sum of the
  retrieved values — one `embedding_bag` over the (N, d_model) table;
- `kind="peer"` (PEER, He 2024, arXiv 2407.04153): each slot is an expert of one neuron, a down
  vector u and an up vector v; the output is Σ gate · act(u·x) · v over the retrieved experts.

`UltraMemory` (UltraMem, Huang et al. 2024, arXiv 2411.12364) keeps the product keys and changes
the three things the paper changes:

- **Tucker-decomposed query-key retrieval (TDQKR)**: each half of a head's query scores `rank`
  sets of sub-keys, S_row and S_col (rank × n_keys each), and a full key (i, j) scores
  S_row[:, i]ᵀ · C · S_col[:, j] through a learned rank × rank core C per head. Candidates come
  from C's rank-one part σ·u·vᵀ: the rows whose uᵀS_row is among the top-k *or the bottom-k*
  and likewise the columns (the paper takes the top-k only; with both ends the top-k of the
  products a_i·b_j of any signs lies in the (2k)² grid, so retrieval is exact whenever C is
  rank one — tested against brute force); the exact Tucker scores of the grid pick the top-k. An
  auxiliary loss keeps C close to rank one: relu(σ₂ − 0.15)² per core for rank 2, as the paper's
  (for a larger rank, on the root of the energy beyond σ₁ rather than on each σᵢ). The rank-one
  direction comes from power iteration, not an SVD: no host sync on a GPU. The weights are the
  raw scores (the paper drops the softmax).
- **Implicit value expansion (IVE)**: the N = n_keys² slots are virtual; slot s reads physical
  row s // E of an (N / E, value_dim) table through projector s % E of E (value_dim → d_model)
  matrices. The retrieved rows are pooled per projector (one `embedding_bag`), then projected:
  E matmuls per token instead of an N × d_model table.
- **Several small layers**: `memory_layers` lists blocks; each gets its own memory.

Not built from the paper: multi-core scoring (a value split across several cores' scores), the
skip-layer placement (the memory beside a later block's MLP: here it replaces the block's MLP, as
pkm/peer do), the query's causal depthwise convolution and the values' decaying learning rate.

Only the retrieved rows of the tables take part in a token's forward and receive gradient; the
tables are ordinary parameters (FSDP2 shards them along N like any weight). A token's output
depends on that token only, so KV-cache decoding and causality are unaffected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.common import RMSNorm
from models.hooks import HookPoint


class ProductKeyMemory(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_keys: int,
        heads: int,
        top_k: int,
        key_dim: int,
        kind: str = "pkm",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if kind not in ("pkm", "peer"):
            raise ValueError(f"memory kind must be 'pkm' or 'peer', got {kind!r}")
        if key_dim % 2 or not 0 < top_k <= n_keys:
            raise ValueError(f"memory: key_dim={key_dim} must be even and top_k={top_k} in 1..n_keys={n_keys}")
        self.n_keys, self.heads, self.top_k, self.key_dim, self.kind = n_keys, heads, top_k, key_dim, kind
        half = key_dim // 2
        self.query = nn.Linear(d_model, heads * key_dim, bias=False)
        self.query_norm = RMSNorm(half, norm_eps)
        self.sub_keys = nn.Parameter(torch.empty(2, heads, n_keys, half))  # halves × heads × keys × dim
        self.values = nn.Parameter(torch.empty(self.size, d_model))  # PKM: values; PEER: up vectors
        self.down = nn.Parameter(torch.empty(self.size, d_model)) if kind == "peer" else None
        self.hook_slots = HookPoint()  # (B, T, heads · top_k): the retrieved slots
        self.init_weights(0.02, 0.02)

    @property
    def size(self) -> int:
        """N: value slots (PKM) or single-neuron experts (PEER)."""
        return self.n_keys**2

    def init_weights(self, std: float, residual_std: float) -> None:
        """Query projection and PEER's down vectors N(0, std); sub-keys N(0, 1/√(key_dim/2)) (unit
        scale scores); the values / up vectors, which write into the residual stream, N(0,
        residual_std); the query norm one."""
        nn.init.normal_(self.query.weight, std=std)
        nn.init.normal_(self.sub_keys, std=1 / math.sqrt(self.key_dim // 2))
        nn.init.normal_(self.values, std=residual_std)
        if self.down is not None:
            nn.init.normal_(self.down, std=std)
        self.query_norm.reset_parameters()

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, d) → (scores, slots) of the top_k full keys of every head, each (M, heads, top_k),
        best first. Exact: the top-k over the k × k candidates of the two halves' top-k."""
        M, k = x.shape[0], self.top_k
        q = self.query_norm(self.query(x).view(M, self.heads, 2, self.key_dim // 2))
        halves = torch.einsum("mhsd,shnd->smhn", q.float(), self.sub_keys.float())  # (2, M, heads, n_keys)
        best, index = halves.topk(k, dim=-1)  # (2, M, heads, k)
        candidates = best[0][..., :, None] + best[1][..., None, :]  # (M, heads, k, k)
        top, flat = candidates.flatten(-2).topk(k, dim=-1)  # (M, heads, k)
        first = index[0].gather(-1, flat // k)
        second = index[1].gather(-1, flat % k)
        return top, first * self.n_keys + second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        scores, slots = self.scores(flat)
        slots = self.hook_slots(slots.view(B, T, -1)).view(B * T, -1)  # (M, heads · k)
        gates = scores.softmax(-1).flatten(1).type_as(x)  # each head's k slots sum to 1
        if self.kind == "peer":
            neurons = F.gelu(torch.einsum("md,mjd->mj", flat, F.embedding(slots, self.down)), approximate="tanh")
            gates = gates * neurons
        out = F.embedding_bag(slots, self.values, per_sample_weights=gates.to(self.values.dtype), mode="sum")
        return out.type_as(x).view(B, T, d)

    def inactive_params(self) -> int:
        """Table rows a token does not touch: all but heads · top_k of the N (per table)."""
        tables = 2 if self.down is not None else 1
        return tables * (self.size - min(self.size, self.heads * self.top_k)) * self.values.shape[1]


# The auxiliary loss leaves each core's singular values beyond the first alone below this margin
# (UltraMem's): a core close enough to rank one that its rank-one candidates find the top-k.
CORE_MARGIN = 0.15


def rank_one(core: torch.Tensor, iterations: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The top singular vectors (u, v), each (heads, r), of every (r, r) core, by power iteration on
    CᵀC from its largest column (exact at once for a rank-one core; no linalg call, so no host
    sync on a GPU). A core of zeros gives zero vectors."""
    gram = core.transpose(-2, -1) @ core
    v = gram.gather(-1, gram.norm(dim=-2).argmax(-1)[:, None, None].expand(-1, gram.shape[-1], 1))[..., 0]
    for _ in range(iterations):
        v = F.normalize(v, dim=-1)
        v = torch.einsum("hrq,hq->hr", gram, v)
    v = F.normalize(v, dim=-1)
    return F.normalize(torch.einsum("hrq,hq->hr", core, v), dim=-1), v


class UltraMemory(nn.Module):
    """UltraMem's memory layer (see the module docstring): `heads` queries, each retrieving `top_k`
    of N = n_keys² virtual slots by Tucker-decomposed product keys of `rank`, read through
    `expansion` projectors from an (N / expansion, value_dim) table. `aux_loss` (training, a
    positive `core_loss_weight`): the cores' rank-one penalty of the last forward."""

    def __init__(
        self,
        d_model: int,
        n_keys: int,
        heads: int,
        top_k: int,
        key_dim: int,
        rank: int = 2,
        expansion: int = 4,
        value_dim: int | None = None,
        core_loss_weight: float = 0.1,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if key_dim % 2 or not 0 < top_k <= n_keys or rank < 1 or expansion < 1 or (n_keys**2) % expansion:
            raise ValueError(
                f"ultramem: key_dim={key_dim} must be even, top_k={top_k} in 1..n_keys={n_keys}, rank={rank} "
                f"and expansion={expansion} positive, and expansion must divide n_keys² = {n_keys**2}"
            )
        self.n_keys, self.heads, self.top_k, self.key_dim = n_keys, heads, top_k, key_dim
        self.rank, self.expansion, self.core_loss_weight = rank, expansion, core_loss_weight
        self.kind = "ultramem"
        half, value_dim = key_dim // 2, value_dim or d_model
        self.query = nn.Linear(d_model, heads * key_dim, bias=False)
        self.query_norm = RMSNorm(half, norm_eps)
        self.sub_keys = nn.Parameter(torch.empty(2, heads, rank, n_keys, half))  # halves × heads × rank × keys
        # Each head's rank × rank core, stored flat: a 3-D parameter would be taken for an expert
        # stack of matrices (Muon's, generalmodel/optim/build.py), and a 2 × 2 core is not one.
        self.core = nn.Parameter(torch.empty(heads, rank * rank))
        self.values = nn.Parameter(torch.empty(self.size // expansion, value_dim))  # physical rows
        self.expand = nn.Parameter(torch.empty(expansion, value_dim, d_model))  # IVE's projectors
        self.hook_slots = HookPoint()  # (B, T, heads · top_k): the retrieved virtual slots
        self.aux_loss: torch.Tensor | None = None
        self.init_weights(0.02, 0.02)

    @property
    def size(self) -> int:
        """N: virtual slots (the physical table has N / expansion rows)."""
        return self.n_keys**2

    def init_weights(self, std: float, residual_std: float) -> None:
        """Query N(0, std); sub-keys N(0, 1/√(key_dim/2)) (unit-scale scores); each core rank one,
        C = e₁e₁ᵀ, so that retrieval starts exact; the values N(0, 1/√(heads·top_k)), so that a
        token's pooled values are O(1) like an MLP's hidden activations; the projectors, which
        write into the residual stream, N(0, residual_std); the query norm one."""
        nn.init.normal_(self.query.weight, std=std)
        nn.init.normal_(self.sub_keys, std=1 / math.sqrt(self.key_dim // 2))
        with torch.no_grad():
            self.core.zero_()
            self.core[:, 0] = 1.0
        nn.init.normal_(self.values, std=1 / math.sqrt(self.heads * self.top_k))
        nn.init.normal_(self.expand, std=residual_std)
        self.query_norm.reset_parameters()

    def sub_scores(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, d) → every sub-key's score (2, M, heads, rank, n_keys), in float32."""
        q = self.query_norm(self.query(x).view(x.shape[0], self.heads, 2, self.key_dim // 2))
        return torch.einsum("mhsd,shrnd->smhrn", q.float(), self.sub_keys.float())

    def cores(self) -> torch.Tensor:
        return self.core.float().view(self.heads, self.rank, self.rank)

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, d) → (scores, slots) of every head's top_k virtual slots, each (M, heads, top_k),
        best first: the exact Tucker scores of the rank-one candidates' (2k)² grid (all n_keys²
        keys when 2k ≥ n_keys)."""
        k, n = self.top_k, self.n_keys
        sub, core = self.sub_scores(x), self.cores()
        if 2 * k >= n:  # the grid would hold every key: score them all
            rows = cols = torch.arange(n, device=x.device).expand(*sub.shape[1:3], n)
        else:
            with torch.no_grad():
                u, v = rank_one(core)
                ends = lambda s: torch.cat([s[..., -k:], s[..., :k]], dim=-1)  # noqa: E731 (top-k, bottom-k)
                rows = ends(torch.einsum("mhrn,hr->mhn", sub[0], u).argsort(dim=-1))
                cols = ends(torch.einsum("mhrn,hr->mhn", sub[1], v).argsort(dim=-1))
        width = rows.shape[-1]
        pick = lambda s, idx: s.gather(-1, idx[:, :, None, :].expand(-1, -1, self.rank, -1))  # noqa: E731
        grid = torch.einsum("mhri,hrq,mhqj->mhij", pick(sub[0], rows), core, pick(sub[1], cols))
        top, flat = grid.flatten(-2).topk(k, dim=-1)
        return top, rows.gather(-1, flat // width) * n + cols.gather(-1, flat % width)

    def core_loss(self) -> torch.Tensor:
        """Σ over heads of relu(s − CORE_MARGIN)², s the root of the energy beyond the first
        singular value, √(‖C‖² − σ₁²): the paper's hinge on σ₂ for rank 2 (for a larger rank it
        hinges each σᵢ, i ≥ 2). σ₁ = ‖Cv‖ with v from `rank_one` (no linalg call: no host sync)."""
        core = self.cores()
        with torch.no_grad():
            _, v = rank_one(core)
        first = torch.einsum("hrq,hq->hr", core, v).square().sum(-1)
        beyond = (core.square().sum((-2, -1)) - first).clamp(min=0)
        return F.relu((beyond + 1e-12).sqrt() - CORE_MARGIN).square().sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        M, E = flat.shape[0], self.expansion
        scores, slots = self.scores(flat)
        slots = self.hook_slots(slots.view(B, T, -1)).view(M, -1)  # (M, heads · k)
        weights = scores.flatten(1)
        # One bag per (token, projector): every retrieved row, weighted by its score where the slot
        # reads through that projector and by zero elsewhere.
        mine = F.one_hot(slots % E, E).permute(0, 2, 1).to(weights.dtype)  # (M, E, heads · k)
        rows = (slots // E)[:, None, :].expand(M, E, -1).reshape(M * E, -1)
        bag_weights = (weights[:, None, :] * mine).reshape(M * E, -1).to(self.values.dtype)
        pooled = F.embedding_bag(rows, self.values, per_sample_weights=bag_weights, mode="sum").view(M, E, -1)
        out = torch.einsum("mev,evd->md", pooled, self.expand.to(pooled.dtype))
        self.aux_loss = self.core_loss_weight * self.core_loss() if self.training and self.core_loss_weight else None
        return out.type_as(x).view(B, T, d)

    def inactive_params(self) -> int:
        """Physical rows a token does not touch: all but (at most) heads · top_k of N / expansion."""
        rows = self.values.shape[0]
        return (rows - min(rows, self.heads * self.top_k)) * self.values.shape[1]

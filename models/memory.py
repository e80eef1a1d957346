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

"""`moeut`: MoEUT (Csordás et al. 2024, arXiv 2405.16039), a universal transformer — layers that
share their parameters — made competitive by mixtures of experts in both sublayers.

- **Shared layers in groups**: `layer_group` G distinct layers (`units`) are used in turn, layer i
  computing with unit i mod G; n_layers / G repetitions of the group. Each of the n_layers
  positions is a `SharedLayer` in `blocks` with hook points of its own (interpretability reads
  `blocks.i.hook_resid_post` per layer, as for every decoder) and its layer index (its own KV
  cache), holding no parameters: the units are the only owners, so state dicts, checkpoints and
  exports hold every weight once.
- **SwitchHead attention** (arXiv 2312.07987): each head's value and output projections are a
  mixture of `att_experts` experts; each token picks `att_top_k` per head by sigmoid scores, the
  values with the scores of the token they come from, the outputs with those of the token that
  reads. Queries and keys are dense. The experts are computed for every token and weighted by the
  gates (zero for those not picked): exactly the definition, but not sparse compute — the FLOP
  count (`flops_per_token`) counts the picked experts only, as the paper does.
- **σ-MoE MLP**: `moe_experts` ReLU experts of `moe_hidden`; the top `moe_top_k` by sigmoid score,
  each output weighted by its score (not normalised); run as grouped matmuls over the tokens each
  expert got (models/moe.py's dropless path).
- **Peri-layernorm**: a norm only where a softmax or sigmoid follows — the inputs of the queries,
  keys and expert selections, and the final norm before the head; the values and the experts read
  the residual stream as it is. No pre-norm on the residual path: the paper's fix for the growth
  of the stream's norm in shared layers.
- **Balance**: the entropy regulariser of σ-MoE and SwitchHead — the negative entropy of the
  selection distribution (softmax of the selection logits) averaged over the batch's tokens, per
  layer use and head, weighted by `moe_entropy_weight`, shifted by log E to be ≥ 0 — in `aux_loss`.

Not built: the paper's relative positions (RoPE here), expert dropout, a separate head width
(head_dim is d_model / n_heads), a sparse SwitchHead kernel, FlexAttention (SDPA only), tensor and
expert parallelism (refused by name). No native transformers class: it exports as remote code,
which carries this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import eager_attention, init_linear, layer_mask, sdpa
from models.common import apply_rope, matmul_flops_per_token
from models.decoder import Decoder, DecoderConfig, _opt, inactive_params, make_norm, unused_fields
from models.hooks import HookPoint
from models.moe import MoE, _grouped_matmul, expert_counts

# DecoderConfig fields MoEUT does not read: refused unless at their defaults.
_NOT_MOEUT = (
    "attention",
    "n_kv_heads",
    "window",
    "global_every",
    "kv_share_group",
    "qk_norm",
    "value_residual",
    "value_embeds",
    "bias",
    "ffn_hidden",
    "memory_layers",
    "long_memory",
    "long_memory_layers",
    "moe_score",
    "moe_aux_loss_weight",
)


@dataclass
class MoEUTConfig(DecoderConfig):
    name: Literal["moeut"] = "moeut"
    layer_group: int = _opt(2, "Distinct layers G; layer i computes with the parameters of layer i mod G.")
    att_experts: int = _opt(4, "SwitchHead: value/output experts per head.")
    att_top_k: int = _opt(1, "SwitchHead: experts each token picks per head.")
    moe_experts: int = _opt(16, "σ-MoE: ReLU experts per MLP.")
    moe_top_k: int = _opt(4, "σ-MoE: experts each token picks.")
    moe_hidden: int | None = _opt(160, "σ-MoE: hidden width of an expert.")
    moe_shared_experts: int = _opt(0, "Not used by MoEUT (no shared experts): must be 0.")
    moe_first_dense: int = _opt(0, "Not used by MoEUT (every layer is MoE): must be 0.")
    moe_bias_update_rate: float = _opt(0.0, "Not used by MoEUT (the entropy regulariser balances): must be 0.")
    moe_entropy_weight: float = _opt(0.01, "Weight of the selections' entropy regulariser (σ-MoE and SwitchHead).")

    def __post_init__(self):
        super().__post_init__()
        changed = unused_fields(self, _NOT_MOEUT)
        if self.moe_shared_experts or self.moe_first_dense or self.moe_bias_update_rate:
            changed.append("moe_shared_experts, moe_first_dense and moe_bias_update_rate must be 0")
        if changed:
            raise ValueError(f"model.name='moeut' does not use {', '.join(changed)}")
        if self.layer_group <= 0 or self.n_layers % self.layer_group:
            raise ValueError(f"layer_group={self.layer_group} must divide n_layers={self.n_layers}")
        if not 0 < self.att_top_k <= self.att_experts:
            raise ValueError(f"att_top_k={self.att_top_k} must be in 1..att_experts={self.att_experts}")
        if self.moe_experts < 2 or not 0 < self.moe_top_k <= self.moe_experts:
            raise ValueError(f"moe_experts={self.moe_experts} must be >= 2, moe_top_k in 1..moe_experts")
        if self.moe_entropy_weight < 0:
            raise ValueError(f"moe_entropy_weight must be >= 0, got {self.moe_entropy_weight}")

    def is_moe(self, layer: int) -> bool:
        return True  # every layer's MLP is a σ-MoE


def selection_imbalance(logits: torch.Tensor) -> torch.Tensor:
    """logits (..., N, E) → log E − H(p̄), p̄ the softmax averaged over the N tokens, summed over any
    leading groups (heads): the negative entropy the paper minimises, shifted to be 0 when the
    batch's selections spread evenly (the KL divergence of p̄ from uniform)."""
    mean = logits.float().softmax(-1).mean(-2)
    return (mean * (mean.clamp_min(1e-9) * logits.shape[-1]).log()).sum()


def pick(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (..., E) → gates (..., E): the top-k scores kept, the others zero."""
    top = torch.topk(scores, k, dim=-1)
    return torch.zeros_like(scores).scatter(-1, top.indices, top.values)


class _Regularised(nn.Module):
    """A module whose forward adds to `aux_loss` (once per use: a shared layer is used n/G times);
    the model empties it before each forward."""

    aux_loss: torch.Tensor | None = None
    entropy_weight = 0.0

    def add_aux(self, logits: torch.Tensor) -> None:
        if self.training and self.entropy_weight > 0:
            loss = self.entropy_weight * selection_imbalance(logits)
            self.aux_loss = loss if self.aux_loss is None else self.aux_loss + loss


class SwitchHeadAttention(_Regularised):
    """The parameters and the computation; each layer that uses it passes its `LayerAttention`,
    which holds that layer's hook points and eager switch."""

    backend = "auto"  # an SDPA backend (set_backend; `flex` leaves it on auto)
    flex = None  # FlexAttention is not built for it

    def __init__(self, cfg: MoEUTConfig):
        super().__init__()
        d, H, E = cfg.d_model, cfg.n_heads, cfg.att_experts
        self.n_heads, self.head_dim, self.n_experts, self.top_k = H, cfg.head_dim, E, cfg.att_top_k
        self.entropy_weight = cfg.moe_entropy_weight
        self.norm = make_norm(cfg)  # peri-layernorm: what the queries, keys and selections read
        self.q_proj = nn.Linear(d, H * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, H * self.head_dim, bias=False)
        self.v_select = nn.Linear(d, H * E, bias=False)
        self.o_select = nn.Linear(d, H * E, bias=False)
        # Expert stacks (head·expert, in, out): the optimizer's matrices (Muon: one per expert).
        self.v_experts = nn.Parameter(torch.empty(H * E, d, self.head_dim))
        self.o_experts = nn.Parameter(torch.empty(H * E, self.head_dim, d))

    def init_weights(self, std: float, residual_std: float) -> None:
        self.norm.reset_parameters()
        for linear in (self.q_proj, self.k_proj, self.v_select, self.o_select):
            init_linear(linear, std)
        nn.init.normal_(self.v_experts, mean=0.0, std=std)
        nn.init.normal_(self.o_experts, mean=0.0, std=residual_std)

    def cache_shapes(self) -> list[tuple[int, int]]:
        return [(self.n_heads, self.head_dim)] * 2

    def _gates(self, select: nn.Linear, xn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = xn.shape
        logits = select(xn).float().view(B, T, self.n_heads, self.n_experts)
        return pick(logits.sigmoid(), self.top_k).type_as(xn), logits

    def forward(self, x, rope, cache, pos, docs, view: LayerAttention) -> torch.Tensor:
        """x: (B, T, d) → (B, T, d), as layer `view.layer` (its slot in the cache, its hook points)."""
        B, T, _ = x.shape
        H, E, hd = self.n_heads, self.n_experts, self.head_dim
        xn = self.norm(x)
        q = self.q_proj(xn).view(B, T, H, hd).transpose(1, 2)
        k = self.k_proj(xn).view(B, T, H, hd).transpose(1, 2)
        v_gates, v_logits = self._gates(self.v_select, xn)
        o_gates, o_logits = self._gates(self.o_select, xn)
        for logits in (v_logits, o_logits):  # balanced per head: (H, B·T, E)
            self.add_aux(logits.permute(2, 0, 1, 3).reshape(H, B * T, E))
        v_gates, o_gates = view.hook_v_gates(v_gates), view.hook_o_gates(o_gates)
        every = torch.einsum("btd,ndh->btnh", x, self.v_experts.to(x.dtype)).view(B, T, H, E, hd)
        v = (every * v_gates.unsqueeze(-1)).sum(3).transpose(1, 2)  # (B, H, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        key_pos = None
        if cache is not None:
            (k, v), key_pos = cache.update(view.layer, pos, k, v)
        mask = layer_mask(T, None, pos, key_pos, x.device) if docs is None else docs.mask(None)
        if view.eager:
            y = eager_attention(q, k, v, mask, view.hook_pattern)
        else:
            y = sdpa(q, k, v, mask, False, self.backend)
        z = view.hook_z(y.transpose(1, 2))  # (B, T, H, hd)
        gated = z.unsqueeze(3) * o_gates.unsqueeze(-1)  # (B, T, H, E, hd)
        o_experts = self.o_experts.to(x.dtype)
        if view.hook_head_out._forward_hooks:  # each head's part of the output, (B, T, H, d): interp only
            per_head = torch.einsum("btnh,nhd->btnd", gated.flatten(3, 4), o_experts.view(H, E * hd, -1))
            return view.hook_head_out(per_head).sum(2)
        return gated.reshape(B, T, H * E * hd) @ o_experts.reshape(H * E * hd, -1)

    def inactive_params(self) -> int:
        """Expert parameters a token does not use (the experts not picked, per head)."""
        per_expert = self.v_experts[0].numel() + self.o_experts[0].numel()
        return self.n_heads * (self.n_experts - self.top_k) * per_expert


class ReluExperts(nn.Module):
    """σ-MoE's experts as stacks — w_up (E, d, h), w_down (E, h, d) — run on rows grouped by expert."""

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, d_model))

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return _grouped_matmul(F.relu(_grouped_matmul(rows, self.w_up, counts)), self.w_down, counts)


class SigmaMoE(_Regularised, MoE):
    """σ-MoE: MoE's routing and dropless grouped path with sigmoid gates that are not normalised,
    no routing bias, no shared experts, ReLU experts, and the selection read from a norm of the
    input (peri-layernorm) while the experts read the input itself."""

    def __init__(self, cfg: MoEUTConfig):
        experts = ReluExperts(cfg.moe_experts, cfg.d_model, cfg.expert_hidden)
        MoE.__init__(
            self, cfg.d_model, cfg.expert_hidden, cfg.moe_experts, cfg.moe_top_k, 0, "sigmoid", 0.0, 0.0, experts
        )
        self.norm = make_norm(cfg)  # (MoE's init ran before it existed: new, it holds its init values)
        self.entropy_weight = cfg.moe_entropy_weight
        del self.hook_router_logits, self.hook_expert_ids  # each layer's `LayerMoE` has its own

    def init_weights(self, std: float, residual_std: float) -> None:
        super().init_weights(std, residual_std)
        if hasattr(self, "norm"):  # not yet while MoE.__init__ runs
            self.norm.reset_parameters()

    def route(self, x: torch.Tensor, view: LayerMoE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., d) → expert ids (..., k), gates (..., k): the chosen sigmoid scores; and the logits."""
        logits = view.hook_router_logits(self.router(self.norm(x)).float())
        top = torch.topk(logits.sigmoid(), self.top_k, dim=-1)
        idx = view.hook_expert_ids(top.indices)
        if self.training:  # the load statistics (logged; no routing bias to move)
            with torch.no_grad():
                self.tokens_per_expert += expert_counts(idx.flatten(), self.n_experts).float()
        return idx, top.values.type_as(x), logits

    def forward(self, x: torch.Tensor, view: LayerMoE) -> torch.Tensor:
        B, T, d = x.shape
        idx, gates, logits = self.route(x, view)
        self.add_aux(logits.reshape(B * T, -1))
        return self._grouped(x.reshape(-1, d), idx.reshape(B * T, -1), gates.reshape(B * T, -1)).view(B, T, d)

    def forward_reference(self, x: torch.Tensor, view: LayerMoE) -> torch.Tensor:
        """The definition: for every token, Σ over its chosen experts of score · expert(token)."""
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        idx, gates, _ = self.route(flat, view)
        out = torch.zeros_like(flat)
        for e in range(self.n_experts):
            token, slot = (idx == e).nonzero(as_tuple=True)
            if len(token):
                y = F.relu(flat[token] @ self.experts.w_up[e]) @ self.experts.w_down[e]
                out.index_add_(0, token, y * gates[token, slot, None])
        return out.view(B, T, d)


class MoEUTUnit(nn.Module):
    """The parameters of one layer of a group: SwitchHead attention and a σ-MoE MLP."""

    def __init__(self, cfg: MoEUTConfig):
        super().__init__()
        self.attn = SwitchHeadAttention(cfg)
        self.mlp = SigmaMoE(cfg)

    def init_weights(self, std: float, residual_std: float) -> None:
        self.attn.init_weights(std, residual_std)
        self.mlp.init_weights(std, residual_std)


class LayerAttention(nn.Module):
    """One layer's use of a shared SwitchHead attention (`shared`, not a registered submodule): the
    layer's index (its KV cache slot), hook points and eager switch; what the KV cache and the
    document masks ask of a layer's attention."""

    eager = False  # True: the written-out attention, whose pattern the hook point sees
    flex = None  # FlexAttention is not built for it: whole sequences take SDPA
    window = None  # every layer is global
    memory = None  # no long memory

    def __init__(self, layer: int, shared: SwitchHeadAttention):
        super().__init__()
        self.layer, self._shared = layer, (shared,)
        self.hook_pattern = HookPoint()  # (B, H, T, S), eager only
        self.hook_z = HookPoint()  # (B, T, H, head_dim): each head's output before its output experts
        self.hook_v_gates = HookPoint()  # (B, T, H, E): the value experts' gates (0: not picked)
        self.hook_o_gates = HookPoint()  # (B, T, H, E)
        self.hook_head_out = HookPoint()  # (B, T, H, d): each head's output (computed when hooked)

    def cache_shapes(self) -> list[tuple[int, int]]:
        return self._shared[0].cache_shapes()

    def forward(self, x, rope=None, cache=None, pos=None, docs=None) -> torch.Tensor:
        return self._shared[0](x, rope, cache, pos, docs, self)


class LayerMoE(nn.Module):
    """One layer's use of a shared σ-MoE: its routing hook points."""

    def __init__(self, shared: SigmaMoE):
        super().__init__()
        self._shared = (shared,)
        self.hook_router_logits = HookPoint()  # (B, T, E), fp32
        self.hook_expert_ids = HookPoint()  # (B, T, top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shared[0](x, self)


class SharedLayer(nn.Module):
    """Layer `layer` of the model, computing with `unit` (not a registered submodule: the model's
    `units` own the parameters): the layer's hook points, and its uses of the unit's attention and
    MLP (`attn`, `mlp`: hook points of their own, no parameters)."""

    def __init__(self, layer: int, unit: MoEUTUnit):
        super().__init__()
        self.layer = layer
        self.attn = LayerAttention(layer, unit.attn)
        self.mlp = LayerMoE(unit.mlp)
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def init_weights(self, std: float, residual_std: float) -> None:
        """The model initialises its units (once each, not once per use)."""

    def forward(self, x, rope=None, cache=None, shared_kv=None, pos=None, docs=None, ve=None):
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(x, rope, cache, pos, docs)))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(x))), None


class MoEUT(Decoder):
    """The decoder with `blocks` = n_layers `SharedLayer`s over `layer_group` `units`."""

    cfg: MoEUTConfig
    fsdp_whole = True  # FSDP2 shards the model as one unit (a unit runs in several layers)

    def make_blocks(self, cfg: MoEUTConfig) -> nn.ModuleList:
        self.units = nn.ModuleList(MoEUTUnit(cfg) for _ in range(cfg.layer_group))
        return nn.ModuleList(SharedLayer(i, self.units[i % cfg.layer_group]) for i in range(cfg.n_layers))

    def layer_modules(self) -> nn.Module:
        return self.units

    def init_weights(self) -> None:
        super().init_weights()
        std = self.cfg.init_std
        residual_std = 0.0 if self.cfg.zero_init else std / (2 * self.cfg.n_layers) ** 0.5
        for unit in self.units:
            unit.init_weights(std, residual_std)

    def _regularised(self) -> list[_Regularised]:
        return [m for m in self.units.modules() if isinstance(m, _Regularised)]

    def forward(self, idx, *args, **kwargs):
        for module in self._regularised():
            module.aux_loss = None
        return super().forward(idx, *args, **kwargs)

    def aux_loss(self) -> torch.Tensor | None:
        losses = [m.aux_loss for m in self._regularised() if m.aux_loss is not None]
        return sum(losses) if losses else None

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: each unit's active parameters counted once per layer that uses
        it (parameters are shared, FLOPs are not), plus attention scores over n_layers."""
        uses = self.cfg.n_layers // self.cfg.layer_group
        unit_active = sum(sum(p.numel() for p in unit.parameters()) - inactive_params(unit) for unit in self.units)
        active = self.num_params(embeddings=False, active=True) + (uses - 1) * unit_active
        return matmul_flops_per_token(active, self.cfg.n_layers, self.cfg.d_model, seq_len)


def fsdp_whole(model: MoEUT, mesh=None, mp_policy=None, expert_mesh=None) -> MoEUT:
    """FSDP2 with the whole model as one unit: its units run in several layers each, so their
    parameters stay gathered through the forward and their gradients are reduced once, after the
    last use in backward (a unit per FSDP group would gather and reduce once per use)."""
    from torch.distributed.fsdp import fully_shard

    if expert_mesh is not None:
        raise ValueError("model.name='moeut': expert parallel is not built for shared-layer experts")
    kwargs = {"mesh": mesh} if mesh is not None else {}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    fully_shard(model, **kwargs)
    return model

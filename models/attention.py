"""Attention kinds, all causal, all with a KV cache for generation:

- `GroupedQueryAttention`: multi-head / grouped-query / multi-query (`n_kv_heads`), optional RoPE,
  optional sliding window (a local layer sees the last `window` positions), optional KV reuse
  (a layer of a cross-layer KV-sharing group takes the K/V of the group's first layer);
- `MultiHeadLatentAttention`: DeepSeek-V2/V3 MLA — K/V come from a low-rank latent `c_kv`
  (kv_lora_rank) plus one decoupled RoPE key shared by all heads; queries optionally through
  their own low-rank bottleneck (q_lora_rank). The cache stores only `c_kv` and the RoPE key.

Each says what it caches (`cache_shapes`, see models/cache.py). With a cache, `pos` (b, T) holds
the absolute position of every query and the mask comes from the positions of the cached slots.

Attention runs in PyTorch's fused SDPA, which never materialises the pattern; `eager = True` on a
module switches it to the written-out softmax(q·kᵀ/√d)·v, whose pattern passes the `hook_pattern`
hook point (models/hooks.py; the interpretability tools turn it on only when a pattern is asked for).

`set_backend(model, name, seq_len)` picks how (train.attention): `auto` lets SDPA choose per shape;
`flash`, `efficient`, `cudnn`, `math` force that SDPA backend; `flex` runs the whole-sequence
attention of GQA layers through FlexAttention with a block mask made once for `seq_len` — causal,
or causal within the window, so a sliding-window layer skips the blocks outside its window instead
of masking a full attention (fast only under torch.compile). Decoding with a cache, other lengths
and MLA keep SDPA.

Packed rows hold several documents. With `Documents` (made by the decoder from each token's
document id), attention is block-causal — a token sees the earlier tokens of its own document
only, within the window — and positions restart at each document: no token's output depends on
another document in its row. SDPA takes the (B, 1, T, T) mask; flex builds a block mask per batch
(per window) from the ids, which also skips the blocks between documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.cache import KVCache, attention_mask
from models.common import RMSNorm, apply_rope
from models.hooks import HookPoint
from models.longmem import LongMemory, far_mask


def init_linear(linear: nn.Linear, std: float) -> None:
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def causal_mask(T: int, window: int | None, device) -> torch.Tensor | None:
    """(T, T) bool for a whole sequence without a cache: query i sees key j iff j ≤ i and, with a
    window, j > i - window. None means plain causal (SDPA's is_causal)."""
    if window is None:
        return None
    positions = torch.arange(T, device=device)[None]
    return attention_mask(positions, positions, window)[0, 0]


def layer_mask(T: int, window: int | None, pos, key_pos, device) -> torch.Tensor | None:
    """The mask of T queries: plain causal without a cache, else from the positions the cached
    slots hold (`pos` (B, T) of the queries, `key_pos` (B, S) of the keys)."""
    if key_pos is None:
        return causal_mask(T, window, device)
    return attention_mask(pos, key_pos, window)


@dataclass
class Documents:
    """The documents of packed rows: `ids` (B, T), equal within a document (documents are
    contiguous runs), and `pos` (B, T), each token's position within its document."""

    ids: torch.Tensor
    pos: torch.Tensor
    _masks: dict = field(default_factory=dict, repr=False)  # window → SDPA mask, made once per batch
    _flex: dict = field(default_factory=dict, repr=False)  # window → block mask, made once per batch

    @classmethod
    def of(cls, ids: torch.Tensor) -> Documents:
        T = ids.shape[1]
        index = torch.arange(T, device=ids.device).expand_as(ids)
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # the document's start
        return cls(ids, index - first)

    def mask(self, window: int | None) -> torch.Tensor:
        """(B, 1, T, T) bool: the query sees a key of its own document at or before it (within the
        window). Made once per window and batch, not once per layer."""
        if window not in self._masks:
            self._masks[window] = self._same() & attention_mask(self.pos, self.pos, window)
        return self._masks[window]

    def far_mask(self, window: int) -> torch.Tensor:
        """(B, 1, T, T) bool: the keys of the query's own document that have left its window — what
        a long-memory layer reads (models/longmem.py)."""
        if ("far", window) not in self._masks:
            self._masks["far", window] = self._same() & far_mask(self.pos, self.pos, window)
        return self._masks["far", window]

    def _same(self) -> torch.Tensor:
        return self.ids[:, None, :, None] == self.ids[:, None, None, :]

    def block_mask(self, window: int | None):
        """FlexAttention's block mask of these rows (causal within each document and the window), at
        flex_length (the padding a document of its own)."""
        if window not in self._flex:
            from torch.nn.attention.flex_attention import create_block_mask

            T = self.ids.shape[1]
            ids = F.pad(self.ids, (0, flex_length(T, self.ids.device) - T), value=-1)

            def mask_mod(b, h, q, k):
                seen = (ids[b, q] == ids[b, k]) & (k <= q)
                return seen if window is None else seen & (q - k < window)

            B, length = ids.shape
            self._flex[window] = create_block_mask(mask_mod, B, None, length, length, device=ids.device)
        return self._flex[window]


@dataclass
class Explicit(Documents):
    """An attention layout given outright, for sequences that are not causal rows (Quiet-STaR's
    thoughts at every position): `pos` (B, T), each token's position (RoPE, learned positions), and
    `allowed` (B, T, T) bool, which keys each query sees; a layer's sliding window applies on the
    positions. SDPA only (a dense mask; flex's block masks are for documents)."""

    allowed: torch.Tensor | None = None

    def mask(self, window: int | None) -> torch.Tensor:
        if window not in self._masks:
            seen = self.allowed[:, None]
            if window is not None:
                seen = seen & (self.pos[:, None, :, None] - self.pos[:, None, None, :] < window)
            self._masks[window] = seen
        return self._masks[window]

    def far_mask(self, window: int) -> torch.Tensor:
        if ("far", window) not in self._masks:
            self._masks["far", window] = self.allowed[:, None] & (
                self.pos[:, None, :, None] - self.pos[:, None, None, :] >= window
            )
        return self._masks["far", window]

    def block_mask(self, window: int | None):
        raise ValueError("an explicit attention layout runs on SDPA, not flex: set_backend(model, 'auto')")


def document_ids(tokens: torch.Tensor, separator: int) -> torch.Tensor:
    """(B, T) document ids of packed rows whose documents each end with `separator` (the EOS the
    text pipeline appends): a document runs up to and including its separator, so a token after
    it starts the next one. The first document of a row may be the tail of one cut by the row."""
    ends = (tokens == separator).int()
    return ends.cumsum(dim=1) - ends  # the separators before this token, not counting itself


SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
BACKENDS = ("auto", *SDPA_BACKENDS, "flex")
CUDA_ONLY = ("efficient", "cudnn")


def sdpa(q, k, v, mask: torch.Tensor | None, gqa: bool, backend: str = "auto") -> torch.Tensor:
    if backend in SDPA_BACKENDS:
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            return sdpa(q, k, v, mask, gqa)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


FLEX_BLOCK = 128  # FlexAttention's default block size (tokens)


def flex_length(seq_len: int, device) -> int:
    """The length flex runs sequences of `seq_len` at: on the CPU, padded to whole 128-token blocks
    (torch 2.13's compiled CPU kernel reads past a partial last block — wrong or NaN outputs, seen
    on an AVX2 machine without AVX-512); the length itself elsewhere. The padding comes after every
    real token, so causal masks keep it out of every real query's view."""
    if torch.device(device).type != "cpu":
        return seq_len
    return -(-seq_len // FLEX_BLOCK) * FLEX_BLOCK


def flex_block_mask(seq_len: int, window: int | None, device):
    """FlexAttention's block mask of a whole sequence: causal, and within `window` if given (at
    flex_length: the CPU's padded length)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if window is None:
        mask_mod = lambda b, h, q, k: k <= q  # noqa: E731
    else:
        mask_mod = lambda b, h, q, k: (k <= q) & (q - k < window)  # noqa: E731
    length = flex_length(seq_len, device)
    return create_block_mask(mask_mod, None, None, length, length, device=device)


def set_local_windows(model: nn.Module, window: int) -> None:
    """Every sliding-window layer of `model` attends over min(`window`, its configured window) — the
    speedrun's window-size warmup changes it as training goes; global layers stay global. A layer
    running flex gets the block mask of its new window (made once per window size)."""
    for module in model.modules():
        if isinstance(module, (GroupedQueryAttention, MultiHeadLatentAttention)) and module.window is not None:
            full = module.__dict__.setdefault("configured_window", module.window)
            module.window = min(window, full)
            if module.flex is not None:
                masks = module.__dict__.setdefault("flex_masks", {})
                seq_len, device = module.flex[0], next(module.parameters()).device
                if module.window not in masks:
                    masks[module.window] = flex_block_mask(seq_len, module.window, device)
                module.flex = (seq_len, masks[module.window])


def set_backend(model: nn.Module, backend: str, seq_len: int | None = None) -> int:
    """Every attention module of `model` runs `backend` (see the module doc); `flex` needs the
    training length `seq_len` and the model on its device. Returns the layers running flex."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; one of {', '.join(BACKENDS)}")
    flex = 0
    for module in model.modules():
        if hasattr(module, "backend"):  # an attention with an SDPA backend: GQA, MLA, MoEUT's SwitchHead
            module.backend = "auto" if backend == "flex" else backend
            module.flex = None  # another backend (again): no block mask left behind
            if backend == "flex" and isinstance(module, GroupedQueryAttention) and seq_len is not None:
                device = next(module.parameters()).device
                module.flex = (seq_len, flex_block_mask(seq_len, module.window, device))
                flex += 1
    return flex


def eager_attention(q, k, v, mask: torch.Tensor | None, hook_pattern: HookPoint) -> torch.Tensor:
    """What `sdpa` computes, written out so that the pattern (B, H, T, S) — each row a softmax over
    the keys a query sees — exists and passes `hook_pattern`. K/V heads are repeated for GQA as
    SDPA's enable_gqa does (query head h reads K/V head h // (H / H_kv))."""
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is None:  # plain causal, T == S
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    pattern = scores.masked_fill(~mask, float("-inf")).float().softmax(-1).type_as(v)
    return hook_pattern(pattern) @ v


def _kv_unfused(state_dict, prefix, *args) -> None:
    """Weights saved when K and V were one projection (`kv_proj`, rows [k | v]) load as `k_proj`
    and `v_proj`."""
    for kind in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}kv_proj.{kind}", None)
        if fused is not None:
            state_dict[f"{prefix}k_proj.{kind}"], state_dict[f"{prefix}v_proj.{kind}"] = fused.chunk(2, dim=0)


class GroupedQueryAttention(nn.Module):
    eager = False  # True: the written-out attention, whose pattern the hook point sees
    backend = "auto"  # an SDPA backend (set_backend)
    flex = None  # (seq_len, FlexAttention block mask): whole sequences of that length use it

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        layer: int,
        window: int | None = None,
        owns_kv: bool = True,
        bias: bool = False,
        shares_kv: bool = False,
        qk_norm: bool = False,
        value_residual: bool = False,
        norm_eps: float = 1e-5,
        value_embed: bool = False,
        memory: LongMemory | None = None,
    ):
        super().__init__()
        if memory is not None and (window is None or not owns_kv or shares_kv):
            raise ValueError("a long-memory layer needs a sliding window and its own K/V, not shared")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.layer, self.window, self.owns_kv = layer, window, owns_kv
        self.shares_kv = shares_kv  # later layers of its group reuse its K/V: return them
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        # A layer that reuses another layer's K/V has no K/V projections at all. Q, K and V are
        # separate matrices (not one fused [k | v]): tensor parallel splits each by heads.
        kv_width = n_kv_heads * self.head_dim
        self.k_proj = nn.Linear(d_model, kv_width, bias=bias) if owns_kv else None
        self.v_proj = nn.Linear(d_model, kv_width, bias=bias) if owns_kv else None
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        # QK-norm: one RMSNorm over head_dim for all query heads, one for all key heads.
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm and owns_kv else None
        # Value residual: layers after the first take v ← v + λ·(v₁ − v), λ learned (from 0.5).
        self.value_residual = value_residual
        self.v_mix = nn.Parameter(torch.full((1,), 0.5)) if value_residual and layer > 0 else None  # FSDP2: 1-D
        # Value embeddings (the speedrun): v ← a·v + b·ve, (a, b) learned from (0.5, 0.5).
        self.ve_mix = nn.Parameter(torch.full((2,), 0.5)) if value_embed else None
        self.memory = memory  # what the heads read beyond the window (models/longmem.py)
        self.hook_pattern = HookPoint()  # (B, H, T, S), eager only
        self.hook_z = HookPoint()  # (B, T, H, head_dim): each head's output before out_proj
        self._register_load_state_dict_pre_hook(_kv_unfused)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Input projections N(0, std); the output projection, which writes into the residual
        stream, N(0, residual_std); biases zero."""
        for linear, s in ((self.q_proj, std), (self.k_proj, std), (self.v_proj, std), (self.out_proj, residual_std)):
            if linear is not None:
                init_linear(linear, s)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()
        for mix in (self.v_mix, self.ve_mix):
            if mix is not None:
                nn.init.constant_(mix, 0.5)
        if self.memory is not None:
            self.memory.init_weights()

    def cache_shapes(self) -> list[tuple[int, int]] | None:
        """K and V, (heads, dim) each (a long-memory layer also the keys before RoPE, which its
        memory is read by); None for a layer that reuses its group's."""
        if not self.owns_kv:
            return None
        return [(self.n_kv_heads, self.head_dim)] * (3 if self.memory is not None else 2)

    def forward(self, x, rope=None, cache: KVCache | None = None, shared_kv=None, pos=None, docs=None, ve=None):
        """x: (B, T, d). Returns (output (B, T, d), what later layers take as `shared_kv`): the K/V
        it used, full length, for the layers of a KV-sharing group; with value residual, the first
        layer's values of these T positions (None, v₁, None), passed on by every layer. `docs`
        (Documents, whole sequences only): attention within each document. `ve` (B, T, kv width):
        the tokens' value embeddings, for a layer made with `value_embed`."""
        B, T, _ = x.shape
        # Head counts from the shapes (-1): under tensor parallel a rank holds some of the heads.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q_content = q  # before RoPE: what a long memory is read with
        if rope is not None:
            q = apply_rope(q, *rope)
        passed = None
        if self.owns_kv:
            k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
            v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if self.ve_mix is not None:
                ve = ve.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2).to(v.dtype)
                v = self.ve_mix[0].to(v.dtype) * v + self.ve_mix[1].to(v.dtype) * ve
            if self.value_residual:
                if self.v_mix is None:  # the first layer: its values go to every later one
                    passed = (None, v, None)
                else:
                    passed = shared_kv
                    v = v + self.v_mix.to(v.dtype) * (shared_kv[1] - v)
            k_content = k
            if rope is not None:
                k = apply_rope(k, *rope)
            key_pos = None
            if cache is not None:  # a long-memory layer caches its keys before RoPE too
                new = (k, v, k_content) if self.memory is not None else (k, v)
                cached, key_pos = cache.update(self.layer, pos, *new)  # (B, H_kv, S, hd) each, (B, S)
                k, v = cached[:2]
                k_content = cached[2] if self.memory is not None else None
        else:
            k, v, key_pos = shared_kv
        gqa = self.n_kv_heads != self.n_heads
        if self.flex is not None and key_pos is None and T == self.flex[0] and not self.eager:
            from torch.nn.attention.flex_attention import flex_attention

            if q.device.type == "cpu":  # compiled CPU flex mis-reads these strided views (torch 2.13)
                q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            block_mask = self.flex[1] if docs is None else docs.block_mask(self.window)
            pad = block_mask.seq_lengths[0] - T  # flex_length's padding (CPU); k, v pass on unpadded
            qkv = (q, k, v) if not pad else tuple(F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            y = flex_attention(*qkv, block_mask=block_mask, enable_gqa=gqa)[:, :, :T]
        else:
            mask = layer_mask(T, self.window, pos, key_pos, x.device) if docs is None else docs.mask(self.window)
            y = (
                eager_attention(q, k, v, mask, self.hook_pattern)
                if self.eager
                else sdpa(q, k, v, mask, gqa, self.backend)
            )
        if self.memory is not None:
            y = self.memory.mix(y, self._far_read(q_content, k_content, v, pos, key_pos, docs, cache))
        out = self.out_proj(self.hook_z(y.transpose(1, 2)).reshape(B, T, -1))
        # Only a group that shares K/V passes them on (FSDP2 warns about view outputs otherwise).
        return out, (k, v, key_pos) if self.shares_kv else passed

    def _far_read(self, q, k, v, pos, key_pos, docs, cache: KVCache | None) -> torch.Tensor:
        """The long memory's read of the positions that have left the window (models/longmem.py):
        over the whole sequence, or, decoding, over the cached memory and the entries of this step;
        then the entries leaving the window are folded into the memory."""
        if key_pos is None:
            if q.shape[2] <= self.window:  # nothing has left the window yet
                return torch.zeros_like(q)
            if docs is not None:
                return self.memory.read(q, k, v, docs.far_mask(self.window))
            positions = torch.arange(q.shape[2], device=q.device)[None]
            return self.memory.read(q, k, v, far_mask(positions, positions, self.window))
        state, rows = cache.memory(self.layer)
        far = self.memory.read(q, k, v, far_mask(pos, key_pos, self.window), state, rows)
        state.fold(rows, k, v, key_pos, pos[:, -1:] - self.window)
        return far


class MultiHeadLatentAttention(nn.Module):
    eager = False  # True: the written-out attention, whose pattern the hook point sees
    backend = "auto"  # an SDPA backend (set_backend)
    memory = None  # no long memory (models/longmem.py: GQA layers only)

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        layer: int,
        kv_lora_rank: int,
        q_lora_rank: int | None,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        norm_eps: float,
        window: int | None = None,
    ):
        super().__init__()
        self.n_heads, self.layer, self.window = n_heads, layer, window
        self.nope, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.kv_lora_rank = kv_lora_rank
        q_dim = n_heads * (qk_nope_head_dim + qk_rope_head_dim)
        if q_lora_rank:
            self.q_down = nn.Linear(d_model, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, norm_eps)
            self.q_up = nn.Linear(q_lora_rank, q_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d_model, q_dim, bias=False)
        # One projection gives the KV latent and the shared RoPE key.
        self.kv_down = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, norm_eps)
        self.kv_up = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.out_proj = nn.Linear(n_heads * v_head_dim, d_model, bias=False)
        self.hook_latent = HookPoint()  # (B, T, kv_lora_rank): the new positions' KV latent
        self.hook_pattern = HookPoint()  # (B, H, T, S), eager only
        self.hook_z = HookPoint()  # (B, T, H, v_head_dim)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Every down/up projection N(0, std) (they stay inside the block); the output projection
        N(0, residual_std); the latent norms one."""
        inputs = [self.q_down, self.q_up] if hasattr(self, "q_up") else [self.q_proj]
        for linear in (*inputs, self.kv_down, self.kv_up):
            init_linear(linear, std)
        init_linear(self.out_proj, residual_std)
        for norm in (getattr(self, "q_norm", None), self.kv_norm):
            if norm is not None:
                norm.reset_parameters()

    def cache_shapes(self) -> list[tuple[int, int]]:
        """The latent and the one RoPE key: (1, kv_lora_rank) and (1, qk_rope_head_dim)."""
        return [(1, self.kv_lora_rank), (1, self.rope_dim)]

    def forward(self, x, rope, cache: KVCache | None = None, shared_kv=None, pos=None, docs=None):
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_up(self.q_norm(self.q_down(x))) if hasattr(self, "q_up") else self.q_proj(x)
        q = q.view(B, T, H, self.nope + self.rope_dim).transpose(1, 2)  # (B, H, T, nope + rope)
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, *rope)

        latent, k_rope = self.kv_down(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope = apply_rope(k_rope[:, None], *rope)  # (B, 1, T, rope): one key for all heads
        latent = self.hook_latent(latent)[:, None]  # (B, 1, T, kv_lora_rank)
        key_pos = None
        if cache is not None:  # the cache holds the latent and the RoPE key, nothing per head
            (latent, k_rope), key_pos = cache.update(self.layer, pos, latent, k_rope)
        S = latent.shape[2]
        kv = self.kv_up(self.kv_norm(latent[:, 0])).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, H, S, ·)
        k = torch.cat([k_nope, k_rope.expand(B, H, S, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        mask = layer_mask(T, self.window, pos, key_pos, x.device) if docs is None else docs.mask(self.window)
        y = (
            eager_attention(q, k, v, mask, self.hook_pattern)
            if self.eager
            else sdpa(q, k, v, mask, False, self.backend)
        )
        return self.out_proj(self.hook_z(y.transpose(1, 2)).reshape(B, T, H * self.v_dim)), None
